"""Who may see and do what: the one place that decides (docs/security.md, "Authorization").

Every HTTP route and websocket command declares a :class:`Rule`: how its caller is
authenticated (:class:`Gate`), the least role it needs, whether it needs an agent profile,
and the object it acts on (:class:`Target`, named by a path parameter or a command field).
Routes declare theirs with ``router.api.deps.needs(rule)`` (staff) or
``router.api.deps.declare(rule)`` (everything else); the websocket commands are tables of
rules in ``router.ws_agent`` and ``router.ws_supervisor``. tests/router/test_authz.py walks
the app's route table and both command tables, so a route or command without a rule fails.

What a caller may see (:class:`Caller`):

- **admins**: everything;
- **supervisors**: the conversations in the queues of their teams (``teams:`` in
  rules.yaml) when teams are configured, every conversation otherwise;
- **agents**: the conversations they hold, were offered, held before, or that sit in one of
  their queues (the queues they are members of or eligible for by skills), and the contacts
  of those. A supervisor or admin with an agent profile sees these too.

Messages, notes, attachments and events belong to their conversation; a contact's
timeline shows the conversations the caller may read. Notes may be written where the
caller may read; replies and other work on a conversation need to hold it (supervisors
may also work conversations they see). Contact fields that routing reads need a
supervisor. An object the caller may not see is answered exactly like one that does not
exist (404); a role or an agent profile the caller lacks is 403; no credentials 401.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from sqlalchemy import ColumnElement, Connection, and_, exists, false, or_, select, true

from router.auth import Principal
from router.exceptions import Forbidden, NotFound, Unauthorized
from router.models import (
    Agent,
    AgentSkill,
    Contact,
    Conversation,
    ConversationEvent,
    Message,
    Offer,
    User,
)
from router.types import OPEN_STATES, EventKind, Role
from routing_rules import QueueSpec, Ruleset

__all__ = [
    "RULES",
    "Caller",
    "Gate",
    "Rule",
    "Target",
    "authorize",
    "caller_of",
    "check_contact_edit",
    "check_role",
    "check_target",
    "frame_visible",
    "may_merge_any",
    "may_work",
    "may_work_unheld",
    "permits",
    "routing_fields",
    "sees_everything",
    "visible_agent_ids",
    "visible_agents",
    "visible_contacts",
    "visible_conversations",
]


class Gate(StrEnum):
    """How a caller proves who they are."""

    NONE = "none"  # public: health, pages, assets, the API's description
    SIGN_IN = "sign-in"  # exchanges a password or token for a session
    SIGNATURE = "signature"  # a provider's webhook signature, a signed survey link
    VISITOR = "visitor"  # a web-chat visitor's token and the inbox's allowed origins
    SESSION = "session"  # a console page: the session cookie, else the sign-in page
    HELLO = "hello"  # a socket: a user's token in the first frame, or the session cookie
    STAFF = "staff"  # a user's token or session: agent, supervisor or admin


class Target(StrEnum):
    """The object a rule checks, named ``<target>_id`` in the path or the command."""

    CONVERSATION = "conversation"
    MESSAGE = "message"
    CONTACT = "contact"
    AGENT = "agent"
    OFFER = "offer"

    @property
    def field(self) -> str:
        return f"{self.value}_id"


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    gate: Gate
    summary: str
    role: Role | None = None  # the least role (STAFF and SESSION gates)
    agent: bool = False  # needs an agent profile (their own work)
    target: Target | None = None  # must be visible to the caller (else 404)


_A, _S, _AD = Role.AGENT, Role.SUPERVISOR, Role.ADMIN
_CONV, _MSG, _CONTACT = Target.CONVERSATION, Target.MESSAGE, Target.CONTACT

PUBLIC = Rule("public", Gate.NONE, "anyone")
SIGN_IN = Rule("sign-in", Gate.SIGN_IN, "anyone; a password or token gives a session")
WEBHOOK = Rule("webhook", Gate.SIGNATURE, "the provider, by its signature")
SURVEY_LINK = Rule("survey-link", Gate.SIGNATURE, "whoever holds the signed survey link")
VISITOR = Rule("visitor", Gate.VISITOR, "a web-chat visitor from an allowed origin")
CONSOLE_PAGE = Rule("console-page", Gate.SESSION, "signed-in staff", _A)
DASHBOARD_PAGE = Rule("dashboard-page", Gate.SESSION, "signed-in supervisors", _S)
SESSION_INFO = Rule("session", Gate.SESSION, "the signed-in user", _A)
SELF = Rule("self", Gate.STAFF, "any staff: their own account, queues, uploads", _A)
OWN_WORK = Rule("own-work", Gate.STAFF, "an agent: their own offers and state", _A, agent=True)
OWN_OFFER = Rule("own-offer", Gate.STAFF, "the agent offered it", _A, True, Target.OFFER)
CONVERSATIONS = Rule("conversations", Gate.STAFF, "staff; only what they may read", _A)
READ_CONVERSATION = Rule("read-conversation", Gate.STAFF, "who may read it", _A, False, _CONV)
WRITE_CONVERSATION = Rule(
    "write-conversation",
    Gate.STAFF,
    "an agent who may read it (notes); replies: its holder, or a supervisor",
    _A,
    True,
    _CONV,
)
WORK_CONVERSATION = Rule(
    "work-conversation", Gate.STAFF, "its holder (or a supervisor who sees it)", _A, True, _CONV
)
TAG_CONVERSATION = Rule(
    "tag-conversation", Gate.STAFF, "its holder, or a supervisor who sees it", _A, False, _CONV
)
SUPERVISE_CONVERSATION = Rule(
    "supervise-conversation", Gate.STAFF, "a supervisor who sees it", _S, False, _CONV
)
READ_MESSAGE = Rule("read-message", Gate.STAFF, "who may read its conversation", _A, False, _MSG)
RESEND_MESSAGE = Rule(
    "resend-message", Gate.STAFF, "the holder of its conversation", _A, True, _MSG
)
READ_CONTACT = Rule(
    "read-contact", Gate.STAFF, "who may read one of its conversations", _A, False, _CONTACT
)
EDIT_CONTACT = Rule(
    "edit-contact",
    Gate.STAFF,
    "who may read it; fields routing reads need a supervisor",
    _A,
    False,
    _CONTACT,
)
MERGE_CONTACTS = Rule(
    "merge-contacts",
    Gate.STAFF,
    "who may read both; agents a suggested match only",
    _A,
    False,
    _CONTACT,
)
SPLIT_CONTACT = Rule("split-contact", Gate.STAFF, "a supervisor who sees it", _S, False, _CONTACT)
CONTACT_DATA = Rule("contact-data", Gate.STAFF, "admins (data requests)", _AD, False, _CONTACT)
AGENTS = Rule("agents", Gate.STAFF, "supervisors; the agents of their teams", _S)
SUPERVISE_AGENT = Rule(
    "supervise-agent", Gate.STAFF, "a supervisor of the agent's team", _S, False, Target.AGENT
)
REPORTS = Rule("reports", Gate.STAFF, "supervisors; the conversations they see", _S)
DASHBOARD = Rule("dashboard", Gate.STAFF, "supervisors; their teams' queues and agents", _S)
ADMIN = Rule("admin", Gate.STAFF, "admins", _AD)
AGENT_SOCKET = Rule("agent-socket", Gate.HELLO, "agents (commands: their own rules)", _A, True)
SUPERVISOR_SOCKET = Rule("supervisor-socket", Gate.HELLO, "supervisors; their teams' view", _S)

RULES: dict[str, Rule] = {
    r.name: r
    for r in (
        PUBLIC,
        SIGN_IN,
        WEBHOOK,
        SURVEY_LINK,
        VISITOR,
        CONSOLE_PAGE,
        DASHBOARD_PAGE,
        SESSION_INFO,
        SELF,
        OWN_WORK,
        OWN_OFFER,
        CONVERSATIONS,
        READ_CONVERSATION,
        WRITE_CONVERSATION,
        WORK_CONVERSATION,
        TAG_CONVERSATION,
        SUPERVISE_CONVERSATION,
        READ_MESSAGE,
        RESEND_MESSAGE,
        READ_CONTACT,
        EDIT_CONTACT,
        MERGE_CONTACTS,
        SPLIT_CONTACT,
        CONTACT_DATA,
        AGENTS,
        SUPERVISE_AGENT,
        REPORTS,
        DASHBOARD,
        ADMIN,
        AGENT_SOCKET,
        SUPERVISOR_SOCKET,
    )
}

# The routes FastAPI adds itself (the API's description and its viewers).
FRAMEWORK_ROUTES: dict[str, Rule] = {
    "/openapi.json": PUBLIC,
    "/docs": PUBLIC,
    "/redoc": PUBLIC,
}


# -- who the caller is and what they may see ----------------------------------------------
@dataclass(frozen=True, slots=True)
class Caller:
    """A principal with the queues whose conversations they may see (``None``: all)."""

    principal: Principal
    queues: frozenset[str] | None

    @property
    def agent_id(self) -> int | None:
        return self.principal.agent_id

    @property
    def name(self) -> str:
        return self.principal.name

    @property
    def user_id(self) -> int:
        return self.principal.user_id

    @property
    def role(self) -> Role:
        return self.principal.role

    def allows(self, role: Role) -> bool:
        return self.principal.allows(role)

    @property
    def sees_all(self) -> bool:
        return self.queues is None


_SKILLS_OF = select(AgentSkill.skill, AgentSkill.level)


def teams_configured(ruleset: Ruleset | None) -> bool:
    return bool(ruleset is not None and ruleset.teams)


def sees_everything(principal: Principal, ruleset: Ruleset | None) -> Caller | None:
    """The caller, when they see everything (admins; supervisors without teams): no need
    to read their agent profile."""
    if principal.allows(Role.ADMIN) or (
        principal.allows(Role.SUPERVISOR) and not teams_configured(ruleset)
    ):
        return Caller(principal, None)
    return None


def caller_of(conn: Connection, principal: Principal, ruleset: Ruleset | None) -> Caller:
    """What ``principal`` may see under ``ruleset`` (the active one; ``None`` before any)."""
    unlimited = sees_everything(principal, ruleset)
    if unlimited is not None:
        return unlimited
    queues: set[str] = set()
    if principal.allows(Role.SUPERVISOR):
        assert ruleset is not None
        for team in ruleset.teams.values():
            if principal.name in team.supervisors:
                queues.update(team.queues)
    if principal.agent_id is not None and ruleset is not None:
        skills = {
            s.skill: int(s.level)
            for s in conn.execute(_SKILLS_OF.where(AgentSkill.agent_id == principal.agent_id))
        }
        queues.update(
            name for name, spec in ruleset.queues.items() if spec.admits(principal.name, skills)
        )
    return Caller(principal, frozenset(queues))


_HELD = (EventKind.ASSIGNED.value, EventKind.TRANSFERRED.value)


def visible_conversations(caller: Caller) -> ColumnElement[bool]:
    """A condition on ``conversations``: the ones ``caller`` may read. List endpoints put
    it in their query, so what is listed, counted and paged is already filtered."""
    if caller.queues is None:
        return true()
    conditions: list[ColumnElement[bool]] = []
    if caller.queues:
        conditions.append(Conversation.queue.in_(sorted(caller.queues)))
    agent = caller.agent_id
    if agent is not None:
        conditions += [
            Conversation.assigned_agent_id == agent,
            Conversation.id.in_(select(Offer.conversation_id).where(Offer.agent_id == agent)),
            Conversation.id.in_(
                select(ConversationEvent.conversation_id).where(
                    ConversationEvent.agent_id == agent, ConversationEvent.kind.in_(_HELD)
                )
            ),
        ]
    return or_(*conditions) if conditions else false()


def visible_contacts(caller: Caller) -> ColumnElement[bool]:
    """A condition on ``contacts``: those of a conversation ``caller`` may read."""
    if caller.queues is None:
        return true()
    # correlated: one index walk per contact (ix_conversations_contact_state)
    return exists().where(Conversation.contact_id == Contact.id, visible_conversations(caller))


def _admitted(spec: QueueSpec) -> ColumnElement[bool]:
    """A condition on ``agents``: eligible for the queue (:meth:`QueueSpec.admits`)."""
    if spec.members is not None:
        return Agent.user_id.in_(select(User.id).where(User.name.in_(sorted(spec.members))))
    return and_(
        true(),
        *(
            exists().where(
                AgentSkill.agent_id == Agent.id,
                AgentSkill.skill == skill,
                AgentSkill.level >= level,
            )
            for skill, level in sorted(spec.skills.items())
        ),
    )


def visible_agents(caller: Caller, ruleset: Ruleset | None) -> ColumnElement[bool]:
    """A condition on ``agents``: for a supervisor with teams, the agents eligible for one
    of their queues (and themselves); everyone otherwise."""
    if caller.queues is None:
        return true()
    conditions: list[ColumnElement[bool]] = []
    if caller.agent_id is not None:
        conditions.append(Agent.id == caller.agent_id)
    if ruleset is not None:
        conditions += [
            _admitted(ruleset.queues[q]) for q in sorted(caller.queues) if q in ruleset.queues
        ]
    return or_(*conditions) if conditions else false()


def visible_agent_ids(conn: Connection, caller: Caller, ruleset: Ruleset | None) -> set[int]:
    query = select(Agent.id).where(visible_agents(caller, ruleset))
    return {int(i) for i in conn.execute(query).scalars()}


def _survivor(conn: Connection, contact_id: int) -> int:
    """The contact ``contact_id`` was merged into, over merges of merges (as its timeline)."""
    for _ in range(16):
        merged_into = conn.execute(
            select(Contact.merged_into_id).where(Contact.id == contact_id)
        ).scalar_one_or_none()
        if merged_into is None:
            break
        contact_id = int(merged_into)
    return contact_id


def _visible(conn: Connection, query: Any) -> bool:
    return conn.execute(query.limit(1)).first() is not None


def check_target(
    conn: Connection, caller: Caller, target: Target, object_id: int, ruleset: Ruleset | None
) -> None:
    """Raise :class:`NotFound` unless ``caller`` may see the object (a missing one and a
    hidden one get the same answer)."""
    if target is Target.CONVERSATION:
        query = select(Conversation.id).where(
            Conversation.id == object_id, visible_conversations(caller)
        )
    elif target is Target.MESSAGE:
        query = (
            select(Message.id)
            .join(Conversation, Conversation.id == Message.conversation_id)
            .where(Message.id == object_id, visible_conversations(caller))
        )
    elif target is Target.CONTACT:
        # a contact merged away is seen by whoever sees the contact it lives on in
        query = select(Contact.id).where(
            Contact.id == _survivor(conn, object_id), visible_contacts(caller)
        )
    elif target is Target.AGENT:
        query = select(Agent.id).where(Agent.id == object_id, visible_agents(caller, ruleset))
    else:  # an offer is its agent's alone
        query = select(Offer.id).where(Offer.id == object_id, Offer.agent_id == caller.agent_id)
    if not _visible(conn, query):
        mine = " for you" if target is Target.OFFER else ""
        raise NotFound(f"no {target.value} {object_id}{mine}")


def check_role(principal: Principal | None, rule: Rule) -> Principal:
    """The caller's credentials against the rule's role and agent profile."""
    if principal is None:
        raise Unauthorized("a valid token is required (Authorization: Bearer ...)")
    if rule.role is not None and not principal.allows(rule.role):
        raise Forbidden(f"this needs the {rule.role.value} role")
    if rule.agent and principal.agent_id is None:
        raise Forbidden("this needs an agent profile (you are not an agent)")
    return principal


def permits(principal: Principal, rule: Rule) -> bool:
    """Whether :func:`check_role` would let ``principal`` through."""
    try:
        check_role(principal, rule)
    except (Unauthorized, Forbidden):
        return False
    return True


# -- what a caller may do with what they see -----------------------------------------------
def may_work_unheld(caller: Caller) -> bool:
    """Supervisors (and admins) may reply to and tag the conversations they see without
    holding them; agents work only what they hold."""
    return caller.allows(Role.SUPERVISOR)


def may_work(caller: Caller, assigned_agent_id: int | None, state: str) -> bool:
    """Whether ``caller`` may change a conversation they see (tags): its holder while it
    is open, or a supervisor."""
    holds = (
        caller.agent_id is not None
        and assigned_agent_id == caller.agent_id
        and state in {s.value for s in OPEN_STATES}
    )
    return holds or may_work_unheld(caller)


def may_merge_any(caller: Caller) -> bool:
    """Supervisors merge any two contacts they see; agents a suggested match only."""
    return caller.allows(Role.SUPERVISOR)


_ALWAYS_ROUTING = ("vip", "tier", "language", "attributes")


def routing_fields(ruleset: Ruleset | None) -> frozenset[str]:
    """The contact fields routing reads: ``vip``, ``tier``, ``language`` and the custom
    ``attributes`` (declared in rules.yaml for rules to test), and ``name`` when the active
    rules test ``contact.name``."""
    fields = set(_ALWAYS_ROUTING)
    if ruleset is not None and "contact.name" in ruleset.tested_facts():
        fields.add("name")
    return frozenset(fields)


def check_contact_edit(caller: Caller, fields: Iterable[str], ruleset: Ruleset | None) -> None:
    """Raise :class:`Forbidden` when an agent changes a field routing reads."""
    if caller.allows(Role.SUPERVISOR):
        return
    refused = sorted(set(fields) & routing_fields(ruleset))
    if refused:
        raise Forbidden(
            f"changing {', '.join(refused)} changes routing: it needs a supervisor",
            fields=refused,
        )


def frame_visible(caller: Caller, frame: Mapping[str, Any], agent_ids: set[int]) -> bool:
    """Whether a stream event may go to ``caller`` (the ``supervisors`` stream carries every
    queue's CSAT answers, SLA alerts, abandoned calls and agents' presence)."""
    if caller.queues is None or frame.get("stream") != "supervisors":
        return True
    if frame.get("conversation_id") is not None or "queue" in frame:
        return frame.get("queue") in caller.queues
    agent = frame.get("agent_id")
    return agent is None or agent in agent_ids


def authorize(
    conn: Connection,
    principal: Principal,
    rule: Rule,
    ruleset: Ruleset | None,
    object_id: int | None = None,
) -> Caller:
    """The caller (role already checked by :func:`check_role`) and, for a rule with a
    target, the check that they may see ``object_id``: in one read."""
    caller = caller_of(conn, principal, ruleset)
    if rule.target is not None and object_id is not None:
        check_target(conn, caller, rule.target, object_id, ruleset)
    return caller
