"""The API's routes, one module per resource, each with an ``APIRouter`` named ``router``:
:mod:`~query.routes.search`, :mod:`~query.routes.items`, :mod:`~query.routes.categories`,
:mod:`~query.routes.health`, :mod:`~query.routes.jobs`, :mod:`~query.routes.keys`,
:mod:`~query.routes.rules` and :mod:`~query.routes.console`. :func:`query.app.create_app`
includes them; the routes reach the engine through :mod:`query.deps`.
"""
