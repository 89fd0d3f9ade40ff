"""The sandbox EHR: a SMART authorization server and scope-enforcing FHIR proxy in front of HAPI.

Public API::

    from sandbox.ehr import EhrConfig, Client, ClientRegistry, create_app, running_ehr

    config = EhrConfig(base_url="http://127.0.0.1:9090", fhir_upstream="http://127.0.0.1:8080/fhir",
                       auto_approve=True)
    config.clients.register(Client("my-app", redirect_uris=[...], scope="launch patient/*.rs"))
    app = create_app(config)                 # an ASGI app; or, in tests:
    with running_ehr(hapi_base, auto_approve=True) as ehr:   # serves on a free port in a thread
        ehr.clients.register(...)

Command line: ``python -m sandbox.ehr --port 9090 --fhir-upstream http://127.0.0.1:8080/fhir``.
"""

from smart_launch._serve import free_port

from ._app import create_app, smart_configuration
from ._clients import Client, ClientConfigError, ClientRegistry
from ._config import EhrConfig
from ._run import RunningEhr, running_ehr, start_in_thread

__all__ = [
    "Client",
    "ClientConfigError",
    "ClientRegistry",
    "EhrConfig",
    "RunningEhr",
    "create_app",
    "free_port",
    "running_ehr",
    "smart_configuration",
    "start_in_thread",
]
