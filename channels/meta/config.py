"""The keys of a ``provider: meta`` inbox in channels.yaml (``channel: messenger`` or
``channel: whatsapp``): what both share (the app, the token, the Graph API, media limits)
and what each needs (a page id; a phone number id and templates).

``api_base_url`` (default ``https://graph.facebook.com``), ``api_version`` (``v21.0``),
``media_hosts`` and ``allow_insecure_media_for_tests`` exist for tests against a local fake;
production keeps their defaults. ``media_hosts`` entries are exact host names or
``*.domain`` wildcards (any host under ``domain``, not ``domain`` itself).
"""

from __future__ import annotations

import re
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from channels.base import InboxConfig

__all__ = ["NUMERIC_ID", "MetaConfig", "MetaTemplate"]

#: Meta's ids (pages, phone numbers, PSIDs, media): digits only.
NUMERIC_ID = re.compile(r"^\d{1,32}$")
_HOST_PATTERN = re.compile(
    r"^(\*\.)?[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*$"
)


class MetaTemplate(BaseModel):
    """A pre-approved WhatsApp template agents may send (``params``: its body variables)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[a-z0-9_]{1,512}$")
    language: str = Field(pattern=r"^[a-z]{2,3}(_[A-Za-z0-9]{2,4})?$")  # en, en_US, pt_BR
    params: int = Field(0, ge=0, le=100)


class MetaConfig(InboxConfig):
    """The keys of a ``provider: meta`` inbox (``channel: messenger`` or ``whatsapp``)."""

    channel: Literal["messenger", "whatsapp"]
    provider: Literal["meta"] = "meta"
    app: str = Field(pattern=r"^\S{1,64}$")  # an entry of meta_apps (secret, verify token)
    page_id: str | None = Field(None, pattern=NUMERIC_ID.pattern)  # messenger
    phone_number_id: str | None = Field(None, pattern=NUMERIC_ID.pattern)  # whatsapp
    access_token: SecretStr  # "${META_TOKEN}": Page token or WhatsApp system-user token
    api_version: str = Field("v21.0", pattern=r"^v\d{1,3}\.\d{1,3}$")
    human_agent_tag: bool = False  # messenger: reply 24 h .. 7 d with the HUMAN_AGENT tag
    templates: list[MetaTemplate] = []  # whatsapp
    standby: bool = False  # messenger: also take messages delivered under standby (handover)
    request_timeout: float = Field(10.0, gt=0, le=120)  # seconds per Graph API request
    media_max_mb: int = Field(25, ge=1, le=100)
    # A wildcard never admits image/svg+xml (scriptable); list it explicitly to accept it.
    media_types: list[str] = [
        "image/*",
        "video/*",
        "audio/*",
        "application/pdf",
        "text/plain",
        "text/csv",
        "text/vcard",
        "text/x-vcard",
        "application/msword",
        "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
        "application/vnd.ms-excel",
        "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
        "application/vnd.ms-powerpoint",
        "application/vnd.openxmlformats-officedocument.presentationml.presentation",
    ]
    # -- test-only overrides: never change these in production ------------------------
    api_base_url: str = "https://graph.facebook.com"
    media_hosts: list[str] = [
        "graph.facebook.com",
        "lookaside.fbsbx.com",
        "*.fbcdn.net",
        "*.fbsbx.com",
    ]
    # !!! TESTS ONLY !!! Admits http:// and loopback media URLs so a local fake can serve
    # media. In production it would let a webhook point our fetcher at localhost.
    allow_insecure_media_for_tests: bool = False

    @field_validator("api_base_url")
    @classmethod
    def _base_url(cls, value: str) -> str:
        if urlsplit(value).scheme not in ("http", "https") or not urlsplit(value).hostname:
            raise ValueError("api_base_url must be an http(s) URL")
        return value.rstrip("/")

    @field_validator("media_hosts")
    @classmethod
    def _hosts(cls, value: list[str]) -> list[str]:
        hosts = [h.strip().lower() for h in value]
        for host in hosts:
            if not _HOST_PATTERN.match(host) and not re.fullmatch(
                r"[0-9.]+|\[?[0-9a-f:]+\]?", host
            ):
                raise ValueError(f"media host {host!r}: a host name or *.domain")
        return hosts

    @model_validator(mode="after")
    def _per_channel(self) -> MetaConfig:
        if self.channel == "messenger":
            if not self.page_id:
                raise ValueError("a messenger inbox needs page_id")
            if self.phone_number_id or self.templates:
                raise ValueError("phone_number_id and templates are for whatsapp inboxes")
        else:
            if not self.phone_number_id:
                raise ValueError("a whatsapp inbox needs phone_number_id")
            if self.page_id or self.human_agent_tag or self.standby:
                raise ValueError("page_id, human_agent_tag and standby are for messenger inboxes")
            seen = set()
            for template in self.templates:
                key = (template.name, template.language)
                if key in seen:
                    raise ValueError(f"template {template.name} ({template.language}) twice")
                seen.add(key)
        return self
