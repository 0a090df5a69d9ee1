"""A real multi-site test environment: sshd compute nodes in shaped network namespaces, real Glance.

Used by the tests, `make demo` and the benchmarks. Modules: `topology` (names and addresses),
`network` (namespaces, links, tbf), `nodes` (sshd compute nodes), `glance` (a Keystone-less
glance-api), `images` (sample images), `hostpaths` (mount points on the host), `testbed` (the whole).
"""

from .testbed import Options, Testbed, TestbedError

__all__ = ["Options", "Testbed", "TestbedError"]
