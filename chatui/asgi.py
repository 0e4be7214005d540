"""The ASGI entry point daphne serves: Django for HTTP, Channels for websockets."""

from __future__ import annotations

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatui.settings")
# Set up Django before importing anything that touches models.
django_asgi_app = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402

from chatui.process import settle_heap  # noqa: E402
from chatui.routing import websocket_urlpatterns  # noqa: E402
from chatui.workers import WithUpkeep  # noqa: E402

application = WithUpkeep(
    ProtocolTypeRouter(
        {
            "http": django_asgi_app,
            "websocket": AllowedHostsOriginValidator(
                AuthMiddlewareStack(URLRouter(websocket_urlpatterns))
            ),
        }
    )
)

# Last: everything start-up imported is made, and kept out of later collections.
settle_heap()
