"""The app's routes, one router per area; ``create_app`` includes them all.

launch   /launch, /callback                        the SMART launch (SMART App Launch 2.x)
review   /review, /write, /resource/{type}/{id}    the pages
api      /api/session, /api/report, /api/drafts, /api/write   the same data as JSON
assets   /, /style.css, /healthz
cds      /cds-services, /cds-services/{id}, /cds-services/{id}/feedback   CDS Hooks 2.0
"""

from . import api, assets, cds, launch, review

__all__ = ["ROUTERS"]

ROUTERS = (launch.router, review.router, api.router, assets.router, cds.router)
