"""``channels.yaml``: inboxes (and the apps of providers whose one webhook serves several
inboxes, like ``meta_apps``), validated with every error located.

    version: 1
    inboxes:
      web: {channel: webchat, provider: omniroute, default_queue: general,
            allowed_origins: ["https://shop.example"]}
      support: {channel: email, provider: imap, imap_host: ..., password: "${IMAP_PASSWORD}"}
    meta_apps:
      main: {app_secret: "${META_APP_SECRET}", verify_token: "${META_VERIFY_TOKEN}"}

``${VAR}`` expands only inside string values; a missing variable is an error naming the
variable, never a value. Each inbox is validated by its channel class's config model, each
app by its provider's (``channels.WEBHOOK_APPS``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ValidationError

from channels import CHANNELS, WEBHOOK_APPS, channel_class
from channels.base import InboxConfig, WebhookApp
from routing_rules import LocatedError, RulesError, did_you_mean
from routing_rules.yamlsafe import MapNode, Node, ScalarNode, SeqNode, load_yaml, to_python

__all__ = ["ChannelsConfig", "load_channels"]

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_SLUG = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
_TOP = ("version", "inboxes", *(app.section for app in WEBHOOK_APPS.values()))


@dataclass
class ChannelsConfig:
    inboxes: dict[str, InboxConfig] = field(default_factory=dict)
    # provider -> app slug -> the app's settings (``meta_apps`` is ``apps["meta"]``)
    apps: dict[str, dict[str, BaseModel]] = field(default_factory=dict)

    def app_of(self, inbox: InboxConfig) -> BaseModel | None:
        """The settings of the app whose webhook carries ``inbox``, if its provider has apps."""
        kind = WEBHOOK_APPS.get(inbox.provider)
        name = getattr(inbox, kind.inbox_key, None) if kind is not None else None
        return self.apps.get(inbox.provider, {}).get(name) if isinstance(name, str) else None


class _Errors:
    def __init__(self) -> None:
        self.items: list[LocatedError] = []

    def add(self, node: Node, where: str, message: str) -> None:
        self.items.append(LocatedError(node.line, node.col, where, message))


def _expand(node: Node, env: Mapping[str, str], where: str, errors: _Errors) -> None:
    """Replace ``${VAR}`` in string scalars, in place."""
    if isinstance(node, ScalarNode):
        if isinstance(node.value, str) and "${" in node.value:

            def sub(match: re.Match[str]) -> str:
                name = match.group(1)
                if name not in env:
                    errors.add(node, where, f"environment variable {name} is not set")
                    return ""
                return env[name]

            node.value = _VAR.sub(sub, node.value)
    elif isinstance(node, SeqNode):
        for i, item in enumerate(node.items):
            _expand(item, env, f"{where}[{i}]", errors)
    elif isinstance(node, MapNode):
        for key, value in node.items:
            _expand(value, env, f"{where}.{key.text}" if where else key.text, errors)


def _node_at(node: Node, loc: tuple[Any, ...]) -> Node:
    """The node a pydantic error location points at (the nearest existing one)."""
    for part in loc:
        if isinstance(node, MapNode) and isinstance(part, str):
            child = node.get(part)
            if child is None:
                return node
            node = child
        elif isinstance(node, SeqNode) and isinstance(part, int) and part < len(node.items):
            node = node.items[part]
        else:
            return node
    return node


def _validate(model: type[BaseModel], node: MapNode, where: str, errors: _Errors) -> Any:
    try:
        return model.model_validate(to_python(node))
    except ValidationError as exc:
        fields = list(model.model_fields)
        for error in exc.errors(include_url=False, include_input=False, include_context=False):
            loc = tuple(error["loc"])
            path = where + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc[:-1])
            if error["type"] == "extra_forbidden":
                key = str(loc[-1])
                key_node = node.key_node(key) if len(loc) == 1 else None
                errors.add(
                    key_node or _node_at(node, loc),
                    path,
                    f'unknown key "{key}"{did_you_mean(key, fields)}',
                )
            elif error["type"] == "missing":
                errors.add(_node_at(node, loc[:-1]), path, f'missing required key "{loc[-1]}"')
            else:
                message = str(error["msg"]).removeprefix("Value error, ")
                errors.add(_node_at(node, loc), f"{where}.{'.'.join(map(str, loc))}", message)
        return None


def load_channels(
    data: bytes | str,
    source: str = "channels.yaml",
    *,
    env: Mapping[str, str] | None = None,
    queues: set[str] | None = None,
) -> ChannelsConfig:
    """Validate channels.yaml; raise :class:`RulesError` (located errors) on any problem.
    ``queues``, when given, are the active ruleset's queues that ``default_queue`` must name."""
    env = os.environ if env is None else env
    root = load_yaml(data, source)
    errors = _Errors()
    if not isinstance(root, MapNode):
        errors.add(root, "", "channels.yaml must be a mapping with version and inboxes")
        raise RulesError(errors.items, source)
    for key, _ in root:
        if key.text not in _TOP:
            errors.add(key, "", f'unknown key "{key.text}"{did_you_mean(key.text, _TOP)}')
    version = root.get("version")
    if version is None:
        errors.add(root, "", 'missing required key "version"')
    elif not (
        isinstance(version, ScalarNode)
        and version.value == 1
        and not isinstance(version.value, bool)
    ):
        errors.add(version, "version", "unsupported version (this omniroute reads version 1)")
    _expand(root, env, "", errors)

    config = ChannelsConfig()
    inboxes = root.get("inboxes")
    if inboxes is not None and not isinstance(inboxes, MapNode):
        errors.add(inboxes, "inboxes", "expected a mapping of inbox slug: settings")
    for key, node in inboxes.items if isinstance(inboxes, MapNode) else []:
        where = f"inboxes.{key.text}"
        if not _SLUG.match(key.text):
            errors.add(
                key,
                "inboxes",
                f'invalid inbox slug "{key.text}" (lowercase letters, digits, - and _)',
            )
            continue
        if not isinstance(node, MapNode):
            errors.add(node, where, "expected a mapping")
            continue
        channel, provider = node.get("channel"), node.get("provider")
        if channel is None or provider is None:
            errors.add(node, where, 'an inbox needs "channel" and "provider"')
            continue
        cls = channel_class(str(getattr(channel, "value", "")), str(getattr(provider, "value", "")))
        if cls is None:
            provider_name = str(getattr(provider, "value", ""))
            if provider_name not in CHANNELS:
                errors.add(
                    provider,
                    f"{where}.provider",
                    f'unknown provider "{provider_name}"{did_you_mean(provider_name, CHANNELS)}',
                )
            else:
                choices = list(CHANNELS[provider_name])
                errors.add(
                    channel,
                    f"{where}.channel",
                    f'provider "{provider_name}" does not serve channel "{getattr(channel, "value", "")}" (one of {", ".join(choices)})',
                )
            continue
        queue_node = node.get("default_queue")
        queue_name = getattr(queue_node, "value", None)
        if (
            queues is not None
            and queue_node is not None
            and isinstance(queue_name, str)
            and queue_name not in queues
        ):
            errors.add(
                queue_node,
                f"{where}.default_queue",
                f'unknown queue "{queue_name}"{did_you_mean(queue_name, sorted(queues))}',
            )
        inbox = _validate(cls.config_model, node, where, errors)
        if inbox is not None:
            config.inboxes[key.text] = inbox

    for provider_id, app_kind in WEBHOOK_APPS.items():
        _apps(root, provider_id, app_kind, config, errors)
    for key, node in inboxes.items if isinstance(inboxes, MapNode) else []:
        for name, wanted in (("verify_email_inbox", "email"), ("verify_sms_inbox", "sms")):
            ref = node.get(name) if isinstance(node, MapNode) else None
            slug = getattr(ref, "value", None)
            if ref is None or not isinstance(slug, str):
                continue
            target = config.inboxes.get(slug)
            if target is None or target.channel != wanted:
                errors.add(
                    ref,
                    f"inboxes.{key.text}.{name}",
                    f'"{slug}" is not an {wanted} inbox here'
                    f"{did_you_mean(slug, sorted(config.inboxes))}",
                )
    if errors.items:
        raise RulesError(errors.items, source)
    return config


def _apps(
    root: MapNode, provider: str, kind: type[WebhookApp], config: ChannelsConfig, errors: _Errors
) -> None:
    """The provider's apps (its ``section``), and that each of its inboxes names one."""
    section = kind.section
    apps = root.get(section)
    found: dict[str, BaseModel] = config.apps.setdefault(provider, {})
    if apps is not None and not isinstance(apps, MapNode):
        keys = ", ".join(kind.config_model.model_fields)
        errors.add(apps, section, f"expected a mapping of app slug: {{{keys}}}")
    for key, node in apps.items if isinstance(apps, MapNode) else []:
        where = f"{section}.{key.text}"
        if not isinstance(node, MapNode):
            errors.add(node, where, "expected a mapping")
            continue
        app = _validate(kind.config_model, node, where, errors)
        if app is not None:
            found[key.text] = app
    inboxes = root.get("inboxes")
    for key, node in inboxes.items if isinstance(inboxes, MapNode) else []:
        if (
            not isinstance(node, MapNode)
            or getattr(node.get("provider"), "value", None) != provider
        ):
            continue
        app_node = node.get(kind.inbox_key)
        app_name = getattr(app_node, "value", None)
        if app_node is not None and isinstance(app_name, str) and app_name not in found:
            errors.add(
                app_node,
                f"inboxes.{key.text}.{kind.inbox_key}",
                f'unknown {kind.title} app "{app_name}" (define it under {section})'
                f"{did_you_mean(app_name, sorted(found))}",
            )
