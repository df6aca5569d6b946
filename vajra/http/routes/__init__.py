"""The bridge's routes, one :class:`fastapi.APIRouter` per resource.

Every route is a thin translation: HTTP in, one SDK call through the context's
:class:`~vajra.http.GatewayPool` out. Each module's ``router`` is included by
:func:`~vajra.http.create_app`; routes take the shared context as ``ctx: Ctx`` and the
caller's key as ``key: ApiKey`` (:mod:`vajra.http._context`).
"""
