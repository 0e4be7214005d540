"""chatui's one settings module.

Everything a deployment changes comes from the environment; the defaults run on a
fresh machine: SQLite, the in-memory channel layer and the built-in demo upstream.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import dj_database_url

BASE_DIR = Path(__file__).resolve().parent.parent
# Local state that is not code: the SQLite file, a generated secret key, the demo login.
DATA_DIR = Path(os.environ.get("CHATUI_DATA_DIR", BASE_DIR / ".data"))
DATA_DIR.mkdir(parents=True, exist_ok=True)


def env_bool(name: str, default: bool = False) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value else default


def env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    return float(value) if value else default


def env_list(name: str, default: str) -> list[str]:
    return [item.strip() for item in os.environ.get(name, default).split(",") if item.strip()]


def generated_secret_key() -> str:
    """A key made once per checkout, so a fresh machine runs without configuration."""
    path = DATA_DIR / "secret-key"
    if not path.exists():
        path.write_text(secrets.token_urlsafe(50))
        path.chmod(0o600)
    return path.read_text().strip()


SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY") or generated_secret_key()
DEBUG = env_bool("DEBUG")
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", "127.0.0.1,localhost")
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", "")

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "channels",
    "chatui",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "csp.middleware.CSPMiddleware",
]

ROOT_URLCONF = "chatui.urls"
ASGI_APPLICATION = "chatui.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "chatui.console.pending_count",
                "chatui.views.theme",
            ],
        },
    },
]

DATABASES = {
    "default": dj_database_url.parse(
        os.environ.get("DATABASE_URL") or f"sqlite:///{DATA_DIR / 'db.sqlite3'}",
        # 0: a connection per trip to the database thread. Kept open, SQLite trips are
        # cheaper but the database thread then starves the event loop of the GIL when many
        # turns start at once (README, Benchmark).
        conn_max_age=env_int("DATABASE_CONN_MAX_AGE", 0),
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
    # A pool per process (psycopg_pool): every trip to the database thread takes a
    # connection and gives it back. Without it each trip opened a new PostgreSQL
    # session, about 20 ms of a turn's four trips (README, Benchmark).
    if DATABASES["default"]["CONN_MAX_AGE"] == 0:
        DATABASES["default"].setdefault("OPTIONS", {}).setdefault(
            "pool",
            {
                "min_size": env_int("DATABASE_POOL_MIN", 2),
                "max_size": env_int("DATABASE_POOL_MAX", 20),
                "timeout": 30,
            },
        )
elif DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # Several writers (the page, the turn runner) share one file: wait rather than fail.
    DATABASES["default"].setdefault("OPTIONS", {}).update(
        {
            "timeout": 20,
            "transaction_mode": "IMMEDIATE",
            # WAL with synchronous=NORMAL syncs at checkpoints, not at every commit: a
            # crash of chatui loses nothing, a power cut at most the last commits.
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        }
    )
    # Tests use a file too: an in-memory database locks whole tables between threads,
    # which is not how the real one behaves.
    # One per process, so two test runs side by side do not share it.
    DATABASES["default"]["TEST"] = {"NAME": str(DATA_DIR / f"test-db-{os.getpid()}.sqlite3")}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"


def redis_channel_layer(url: str) -> dict:
    """The channel layer of several workers sharing Redis (see chatui/layers.py)."""
    return {
        "BACKEND": "chatui.layers.RedisChannelLayer",
        "CONFIG": {
            "hosts": [{"address": url}],
            "capacity": 1000,
            # Every socket and turn of a process shares one Redis inbox, and its
            # capacity is counted over all of them: room for a busy process.
            "channel_capacity": {"specific.*": 20000},
            "expiry": 60,
        },
    }


REDIS_URL = os.environ.get("REDIS_URL", "")
if REDIS_URL:
    CHANNEL_LAYERS = {"default": redis_channel_layer(REDIS_URL)}
else:
    CHANNEL_LAYERS = {
        "default": {"BACKEND": "chatui.layers.InMemoryChannelLayer", "CONFIG": {"capacity": 1000}}
    }

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "home"
LOGOUT_REDIRECT_URL = "login"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = DATA_DIR / "static"
STATIC_ROOT.mkdir(exist_ok=True)
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
}
# Serve straight from static/ when collectstatic has not run (tests, first start).
WHITENOISE_USE_FINDERS = True

# Production hardening, on when DEBUG is off; see the README for each.
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
X_FRAME_OPTIONS = "DENY"
SESSION_COOKIE_HTTPONLY = True
SESSION_COOKIE_SECURE = env_bool("SECURE_COOKIES", False)
CSRF_COOKIE_SECURE = SESSION_COOKIE_SECURE
SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", False)
SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = SECURE_HSTS_SECONDS > 0
SECURE_HSTS_PRELOAD = env_bool("SECURE_HSTS_PRELOAD", False)
if env_bool("BEHIND_TLS_PROXY", False):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")

# Content-Security-Policy (django-csp), on every response, the admin's included.
# Pages load scripts, styles, fonts and data from chatui itself only: no inline
# scripts or styles, no eval, no plugins, no framing. Images may also be data: and
# blob: URLs (the composer previews an attached image from a blob before it is sent).
# Agent-written text cannot add anything here: it is sanitised HTML without scripts,
# styles or event handlers, and this policy is the second wall behind that.
CONTENT_SECURITY_POLICY = {
    "DIRECTIVES": {
        "default-src": ["'self'"],
        "script-src": ["'self'"],
        "style-src": ["'self'"],
        "img-src": ["'self'", "data:", "blob:"],
        "connect-src": ["'self'"],
        "font-src": ["'self'"],
        "object-src": ["'none'"],
        "base-uri": ["'none'"],
        "frame-ancestors": ["'none'"],
        "form-action": ["'self'"],
    }
}

# The Letta server. Unset: the built-in demo upstream, which `manage.py up` starts.
DEMO_UPSTREAM_PORT = env_int("DEMO_UPSTREAM_PORT", 8290)
LETTA_BASE_URL = os.environ.get("LETTA_BASE_URL", "").rstrip("/")
DEMO_UPSTREAM = not LETTA_BASE_URL
if DEMO_UPSTREAM:
    LETTA_BASE_URL = f"http://127.0.0.1:{DEMO_UPSTREAM_PORT}"
LETTA_API_KEY = os.environ.get("LETTA_API_KEY", "")
# Seconds: connecting; the longest silence tolerated between two stream events; how
# long a stream may send nothing at all (its headers and first event) before it fails;
# and how long a call made while a page waits (agent lists, models, checks) may take.
LETTA_CONNECT_TIMEOUT = env_float("LETTA_CONNECT_TIMEOUT", 5.0)
LETTA_READ_TIMEOUT = env_float("LETTA_READ_TIMEOUT", 120.0)
LETTA_FIRST_EVENT_TIMEOUT = env_float("LETTA_FIRST_EVENT_TIMEOUT", 60.0)
LETTA_PAGE_TIMEOUT = env_float("LETTA_PAGE_TIMEOUT", 5.0)

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": os.environ.get("LOG_LEVEL", "INFO")},
    "loggers": {"httpx": {"level": "WARNING"}, "httpcore": {"level": "WARNING"}},
}

# Live relay.
# Token deltas go to the browser at most this often per turn (seconds).
STREAM_FLUSH_INTERVAL = env_float("STREAM_FLUSH_INTERVAL", 0.04)
# After Stop, how long Letta gets to end the stream before chatui closes it.
STOP_GRACE_SECONDS = env_float("STOP_GRACE_SECONDS", 5.0)
# How long a reconnecting page waits for the running turn's snapshot (seconds).
SNAPSHOT_TIMEOUT = env_float("SNAPSHOT_TIMEOUT", 3.0)
# Largest websocket frame accepted from a browser, and longest message text.
MAX_FRAME_BYTES = env_int("MAX_FRAME_BYTES", 64 * 1024)
MAX_MESSAGE_CHARS = env_int("MAX_MESSAGE_CHARS", 20_000)
# Images attached to a message: how many, how large each, and which types.
IMAGE_MAX_COUNT = env_int("IMAGE_MAX_COUNT", 4)
IMAGE_MAX_BYTES = env_int("IMAGE_MAX_BYTES", 5 * 1024 * 1024)
IMAGE_TYPES = env_list("IMAGE_TYPES", "image/png,image/jpeg,image/gif,image/webp")
# Offer agents a client-side tool that asks the person a question (see README).
OFFER_ASK_USER = env_bool("OFFER_ASK_USER", True)
# How many messages one user may send per SEND_RATE_WINDOW seconds, across conversations.
SEND_RATE_LIMIT = env_int("SEND_RATE_LIMIT", 30)
SEND_RATE_WINDOW = env_int("SEND_RATE_WINDOW", 60)
# Messages per page in the transcript; older pages load on scroll.
MESSAGES_PAGE_SIZE = env_int("MESSAGES_PAGE_SIZE", 50)

# Tool approvals.
# Whether a conversation's owner may decide its approvals (besides users with the
# chatui.decide_approvalrequest permission, e.g. members of an "Approvers" group).
APPROVALS_OWNER_MAY_DECIDE = env_bool("APPROVALS_OWNER_MAY_DECIDE", True)
# Deny pending approvals older than this many seconds, with the reason "expired" (0: never).
APPROVAL_EXPIRE_AFTER = env_int("APPROVAL_EXPIRE_AFTER", 0)

# Resilience.
# Ask Letta to run turns in the background (resumable after a dropped stream or a
# restarted worker); servers without Redis answer 503 and are streamed directly.
LETTA_BACKGROUND = env_bool("LETTA_BACKGROUND", True)
# How often a broken background stream is re-attached before the turn fails.
RESUME_ATTEMPTS = env_int("RESUME_ATTEMPTS", 5)
# This process's name among workers (set one per daphne process to have a restarted
# worker resume its own turns at once), its heartbeat, and when it counts as gone.
WORKER_NAME = os.environ.get("CHATUI_WORKER_NAME", "")
WORKER_HEARTBEAT = env_float("WORKER_HEARTBEAT", 5.0)
WORKER_TIMEOUT = env_float("WORKER_TIMEOUT", 15.0)
WORKER_UPKEEP = env_bool("WORKER_UPKEEP", True)
# A turn waiting for its agent checks the lock at least this often (seconds).
AGENT_LOCK_POLL = env_float("AGENT_LOCK_POLL", 1.0)
