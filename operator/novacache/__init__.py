"""nova-image-cache-operator: keeps Glance images pre-cached on Nova compute nodes, site by site."""

__version__ = "0.1.0"
