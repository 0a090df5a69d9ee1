"""Paste filter that lets a test Glance trust every request as one admin user, without Keystone.

Glance's own `unauthenticated-context` builds a context with no user and no project: the default
policies then answer 403, and imports (copy-image, glance-direct) fail with 500 because they need a
project id. This filter stands in its place with fixed ids and admin roles.

It runs inside Glance's own virtualenv (it imports glance): GlanceServer copies it next to its config
and gunicorn loads it from there as the top-level module `glance_noauth`. The project never imports it.
"""

from glance.api import policy
from glance.api.middleware.context import BaseContextMiddleware
import glance.context

USER_ID = "00000000000000000000000000000001"
PROJECT_ID = "00000000000000000000000000000002"
ROLES = ["admin", "member", "reader"]


class FixedAdminContextMiddleware(BaseContextMiddleware):
    """Attach the same admin RequestContext (fresh per request, shared policy enforcer) to every request."""

    def __init__(self, app):
        self.policy_enforcer = policy.Enforcer()
        super().__init__(app)

    def process_request(self, req):
        req.context = glance.context.RequestContext(
            user_id=USER_ID, project_id=PROJECT_ID, roles=list(ROLES), is_admin=True,
            request_id=req.headers.get("X-Openstack-Request-ID"),
            policy_enforcer=self.policy_enforcer)


filter_factory = FixedAdminContextMiddleware.factory
