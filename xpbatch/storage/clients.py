"""Object-storage settings, clients and errors under :mod:`~xpbatch.storage.location`.

:class:`StorageOptions` are the explicit settings over the standard AWS environment;
:func:`object_store` builds one obstore client per process and settings and reuses it;
:func:`storage_errors` turns obstore's errors into one line that names the URL and never a
secret. Functions take any location-like object (``scheme``, ``bucket``, ``url``, ``options``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import hashlib
import json
import os
import re
import threading
import uuid
from collections.abc import Iterator, Mapping
from typing import Any, Protocol

from xpbatch.config import from_mapping
from xpbatch.errors import ConfigError, StorageError, StorageNotFoundError


class Where(Protocol):
    """What the clients need to know of a location."""

    @property
    def scheme(self) -> str: ...
    @property
    def bucket(self) -> str: ...
    @property
    def url(self) -> str: ...
    @property
    def options(self) -> StorageOptions: ...


_SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
_SETTING_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ENDPOINT",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_PROFILE",
    "AWS_ALLOW_HTTP",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_CONFIG_FILE",
)
_ALIASES = {
    "key": "access_key_id",
    "aws_access_key_id": "access_key_id",
    "secret": "secret_access_key",
    "aws_secret_access_key": "secret_access_key",
    "token": "session_token",
    "aws_session_token": "session_token",
    "endpoint": "endpoint_url",
    "region_name": "region",
    "anon": "anonymous",
    "skip_signature": "anonymous",
}
"""Other names readers use for the same settings (s3fs, obstore, boto3)."""


@dataclasses.dataclass(frozen=True)
class StorageOptions:
    """Explicit object-storage settings, over the standard AWS environment variables and files.

    Every field is optional; ``None`` means "as the environment says". The secrets are left out
    of ``repr`` (and of every message), so printing a location or its options is safe.
    """

    endpoint_url: str | None = None
    """The S3 endpoint, e.g. http://127.0.0.1:8333 for a local server (AWS_ENDPOINT_URL)."""
    region: str | None = None
    """The bucket's region (AWS_REGION)."""
    profile: str | None = None
    """A named profile of the AWS shared credentials and config files (AWS_PROFILE)."""
    access_key_id: str | None = dataclasses.field(default=None, repr=False)
    """The access key id (AWS_ACCESS_KEY_ID); better left to the environment."""
    secret_access_key: str | None = dataclasses.field(default=None, repr=False)
    """The secret access key (AWS_SECRET_ACCESS_KEY); better left to the environment."""
    session_token: str | None = dataclasses.field(default=None, repr=False)
    """A temporary session token (AWS_SESSION_TOKEN)."""
    allow_http: bool | None = None
    """Allow a plain http:// endpoint (AWS_ALLOW_HTTP=true), e.g. a test server."""
    anonymous: bool = False
    """Send unsigned requests (a public bucket)."""
    unsafe_no_conditional_writes: bool = False
    """UNSAFE: run on a server that ignores conditional writes; two writers may then corrupt one
    output unseen. Only for a server you know has a single writer."""
    lease_ttl_s: float = 60.0
    """Seconds an output's lease (its lock object) lives without renewal: how long a killed
    run keeps others out before ``--resume`` may take it over (``--break-lock``: at once)."""

    def __post_init__(self) -> None:
        if isinstance(self.lease_ttl_s, int) and not isinstance(self.lease_ttl_s, bool):
            object.__setattr__(self, "lease_ttl_s", float(self.lease_ttl_s))
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            kind = {"bool": bool, "float": float}.get(str(field.type).split(" ")[0], str)
            if value is not None and not isinstance(value, kind):
                shown = "a secret" if not field.repr else repr(value)
                raise ConfigError(
                    f"storage option {field.name} must be a {kind.__name__}, got {shown}"
                )
        if not self.lease_ttl_s > 0:
            raise ConfigError(
                f"storage option lease_ttl_s must be positive, got {self.lease_ttl_s}"
            )
        if self.endpoint_url is not None and not re.match(r"^https?://", self.endpoint_url):
            raise ConfigError(
                f"storage option endpoint_url must start with http:// or https://, got "
                f"{self.endpoint_url!r}"
            )

    @classmethod
    def parse(cls, options: StorageOptions | Mapping[str, Any] | str | None) -> StorageOptions:
        """Options from a mapping (a ``[storage]`` table) or JSON text (``--storage-options``).

        Common aliases are accepted (s3fs's ``key``/``secret``/``anon``, ``endpoint``,
        ``region_name``, ``client_kwargs.endpoint_url``); an unknown key names the valid ones.
        """
        if options is None:
            return cls()
        if isinstance(options, StorageOptions):
            return options
        if isinstance(options, str):
            try:
                options = json.loads(options)
            except json.JSONDecodeError as e:
                raise ConfigError(
                    f"storage options must be a JSON object, e.g. "
                    f'{{"endpoint_url": "http://127.0.0.1:8333"}}; could not parse it: {e.msg} '
                    f"at character {e.pos}"
                ) from None
            if not isinstance(options, dict):
                raise ConfigError(
                    f"storage options must be a JSON object, got a {type(options).__name__}"
                )
        values = dict(options)
        client_kwargs = values.pop("client_kwargs", None) or {}
        values.update({k: v for k, v in client_kwargs.items() if k in ("endpoint_url",)})
        if "region_name" in client_kwargs:
            values["region"] = client_kwargs["region_name"]
        values = {_ALIASES.get(k, k): v for k, v in values.items()}
        return from_mapping(cls, values, where="storage options")

    def secrets(self) -> tuple[str, ...]:
        """The secret values set here (to keep them out of messages)."""
        values = (self.access_key_id, self.secret_access_key, self.session_token)
        return tuple(v for v in values if v)

    @property
    def secret_ref(self) -> str | None:
        """A random name for this process's copy of the secrets (never derived from them);
        None without secrets. A pickled copy carries only this name (see :meth:`__reduce__`)."""
        if not self.secrets():
            return None
        values = (self.access_key_id, self.secret_access_key, self.session_token)
        with _SECRETS_GUARD:
            for ref, known in _SECRETS.items():
                if known == values:
                    return ref
            ref = uuid.uuid4().hex
            _SECRETS[ref] = values
            return ref

    def without_secrets(self) -> StorageOptions:
        """These settings with the secrets left out (the environment then supplies them)."""
        return dataclasses.replace(
            self, access_key_id=None, secret_access_key=None, session_token=None
        )

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickle without the secrets: a copy sent to another process (a Dask task, a worker)
        carries :attr:`secret_ref` only. There the secrets come back if that process knows the
        name (:func:`register_secrets`, e.g. from a worker plugin), else its own environment
        (``AWS_ACCESS_KEY_ID`` ...) supplies the credentials."""
        public = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.repr}
        return (_restore_options, (public, self.secret_ref))


_SECRETS: dict[str, tuple[str | None, str | None, str | None]] = {}
"""secret_ref -> (access key id, secret key, session token) known to this process."""
_SECRETS_GUARD = threading.Lock()


def register_secrets(ref: str, values: tuple[str | None, str | None, str | None]) -> None:
    """Make the secrets named ``ref`` known to this process (what a worker plugin does)."""
    with _SECRETS_GUARD:
        _SECRETS[ref] = values


def known_secrets(ref: str) -> tuple[str | None, str | None, str | None] | None:
    """The secrets named ``ref`` in this process, if known."""
    with _SECRETS_GUARD:
        return _SECRETS.get(ref)


def _restore_options(public: dict[str, Any], ref: str | None) -> StorageOptions:
    """Unpickle :class:`StorageOptions`: the secrets from this process's registry, if known."""
    secrets = known_secrets(ref) if ref else None
    if secrets is None:
        return StorageOptions(**public)
    key, secret, token = secrets
    return StorageOptions(
        **public, access_key_id=key, secret_access_key=secret, session_token=token
    )


# Clients ----------------------------------------------------------------------------------


def _environment() -> tuple[tuple[str, str], ...]:
    return tuple((k, os.environ[k]) for k in _SETTING_ENV if os.environ.get(k))


def _secret_digest(options: StorageOptions) -> str:
    """A digest of every secret in play, so that the client cache notices a change of keys."""
    values = [*(os.environ.get(k, "") for k in _SECRET_ENV), *options.secrets()]
    return hashlib.sha256("\0".join(values).encode()).hexdigest()


def object_store(location: Where, *, prefix: str | None = None) -> Any:
    """The obstore store of ``location``'s bucket (rooted at ``prefix`` if given): built once
    per process and settings, then reused."""
    return _cached_store(
        location.scheme,
        location.bucket,
        prefix,
        location.options,
        _environment(),
        _secret_digest(location.options),
    )


@functools.lru_cache(maxsize=64)
def _cached_store(
    scheme: str,
    bucket: str,
    prefix: str | None,
    options: StorageOptions,
    environment: tuple[tuple[str, str], ...],
    secret_digest: str,
) -> Any:
    """One client per process and settings (the last two arguments are only cache keys)."""
    from obstore.store import S3Store

    env = dict(environment)
    config: dict[str, Any] = {}
    if options.endpoint_url:
        config["endpoint"] = options.endpoint_url
    if options.region:
        config["region"] = options.region
    if options.access_key_id:
        config["access_key_id"] = options.access_key_id
    if options.secret_access_key:
        config["secret_access_key"] = options.secret_access_key
    if options.session_token:
        config["session_token"] = options.session_token
    if options.anonymous:
        config["skip_signature"] = True
    client: dict[str, Any] = {}
    if options.allow_http is not None:
        client["allow_http"] = options.allow_http
    provider = None
    profile = options.profile or env.get("AWS_PROFILE")
    has_keys = options.access_key_id or os.environ.get("AWS_ACCESS_KEY_ID")
    if not has_keys and not options.anonymous and (profile or _shared_credentials_exist()):
        provider = _ProfileCredentials(profile)
        if "region" not in config and provider.region and not env.get("AWS_REGION"):
            config["region"] = provider.region
    return S3Store(
        bucket,
        prefix=prefix or None,
        config=config,  # type: ignore[arg-type]
        client_options=client or None,  # type: ignore[arg-type]
        credential_provider=provider,  # type: ignore[arg-type]
    )


def _shared_credentials_exist() -> bool:
    path = os.environ.get("AWS_SHARED_CREDENTIALS_FILE") or os.path.expanduser("~/.aws/credentials")
    return os.path.isfile(path)


class _ProfileCredentials:
    """Credentials of an AWS profile (shared credentials/config files), refreshed by botocore."""

    def __init__(self, profile: str | None) -> None:
        try:
            import botocore.session
        except ImportError:
            raise ConfigError(
                "an AWS profile needs botocore (pip install s3fs, or set AWS_ACCESS_KEY_ID "
                "and AWS_SECRET_ACCESS_KEY)"
            ) from None
        session = botocore.session.Session(profile=profile)
        self.profile = profile
        self.region: str | None = session.get_config_variable("region")
        self._credentials = session.get_credentials()

    def __repr__(self) -> str:
        return f"_ProfileCredentials(profile={self.profile!r})"

    def __call__(self) -> dict[str, Any]:
        if self._credentials is None:
            raise StorageError(
                f"no credentials found for AWS profile {self.profile or 'default'!r}; check "
                "~/.aws/credentials or set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
            )
        frozen = self._credentials.get_frozen_credentials()
        expires = datetime.datetime.now(datetime.UTC) + datetime.timedelta(minutes=10)
        return {
            "access_key_id": frozen.access_key,
            "secret_access_key": frozen.secret_key,
            "token": frozen.token,
            "expires_at": expires,
        }


# Errors -----------------------------------------------------------------------------------

_CODE_RE = re.compile(r"<Code>([^<]{1,64})</Code>")
_HINTS = {
    "NoSuchBucket": "the bucket does not exist at {endpoint}; create it or fix the URL",
    "InvalidAccessKeyId": "the access key is not known to {endpoint}; check AWS_ACCESS_KEY_ID "
    "(or the profile)",
    "SignatureDoesNotMatch": "the secret key does not match the access key at {endpoint}; check "
    "AWS_SECRET_ACCESS_KEY (or the profile)",
    "AccessDenied": "access denied by {endpoint}; check the credentials and the bucket policy",
    "ExpiredToken": "the session token has expired; refresh AWS_SESSION_TOKEN",
}


def endpoint_of(location: Where) -> str:
    """The endpoint a location talks to, for messages (never holds a secret)."""
    env = os.environ
    return (
        location.options.endpoint_url
        or env.get("AWS_ENDPOINT_URL_S3")
        or env.get("AWS_ENDPOINT_URL")
        or env.get("AWS_ENDPOINT")
        or "the AWS default endpoint"
    )


def describe_error(error: BaseException, location: Where) -> tuple[str, bool]:
    """A one-line reason for an obstore error (no secret) and whether it means "not found"."""
    text = str(error)
    endpoint = endpoint_of(location)
    match = _CODE_RE.search(text)
    code = match.group(1) if match else ""
    if code in _HINTS:
        return f"{code}: {_HINTS[code].format(endpoint=endpoint)}", False
    if code == "NoSuchKey":
        return "no such object", True
    if code:
        return f"the server answered {code}", False
    name = type(error).__name__
    if name == "NotFoundError" or isinstance(error, FileNotFoundError):
        return "no such object", True
    if name in ("PermissionDeniedError", "UnauthenticatedError"):
        return f"access denied by {endpoint}; check the credentials", False
    if "connect" in text.lower() or "dns" in text.lower():
        return f"cannot reach {endpoint}; is the endpoint right and the server up?", False
    if endpoint.startswith("http://") and "builder error" in text:
        return f"{endpoint} is plain http; set AWS_ALLOW_HTTP=true to allow it", False
    first = text.splitlines()[0] if text else name
    return first[:300], False


def scrub(text: str, location: Where) -> str:
    """``text`` with every secret in play replaced by ``***``."""
    secrets = [os.environ.get(k, "") for k in _SECRET_ENV] + list(location.options.secrets())
    for secret in secrets:
        if len(secret) >= 4:
            text = text.replace(secret, "***")
    return text


@contextlib.contextmanager
def storage_errors(location: Where, action: str) -> Iterator[None]:
    """Turn an obstore error into a one-line :class:`StorageError` naming the URL (no secret)."""
    try:
        yield
    except (StorageError, ConfigError):
        raise
    except Exception as e:
        if not _is_obstore_error(e) or type(e).__name__ in _CONDITION_FAILURES:
            raise
        reason, not_found = describe_error(e, location)
        message = scrub(f"cannot {action} {location.url}: {reason}", location)
        if not_found:
            raise StorageNotFoundError(message) from None
        raise StorageError(message) from None


_CONDITION_FAILURES = ("AlreadyExistsError", "PreconditionError", "NotModifiedError")
"""Answers to a conditional request that its caller handles (not failures of the storage)."""


def _is_obstore_error(error: BaseException) -> bool:
    return type(error).__module__.startswith("obstore") or isinstance(
        error, FileNotFoundError | PermissionError | ConnectionError | TimeoutError
    )
