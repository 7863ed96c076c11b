"""Write the Meta webhook fixtures in tests/channels/fixtures/meta/ from the builders.

Every id and timestamp is fixed, so the files are stable. Regenerate with::

    .venv/bin/python -m tests.fakes.make_meta_fixtures          # write
    .venv/bin/python -m tests.fakes.make_meta_fixtures --check  # exit 1 if stale

The files hold the parsed JSON (pretty-printed). What Meta puts on the wire is the compact,
escaped form: post ``meta_json_bytes(payload)`` and sign those bytes
(``signed_request(app_secret, payload)``), never the file's bytes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.fakes.meta import (
    APP_ID,
    WA_ID,
    as_standby,
    batched,
    messenger_attachment,
    messenger_delivery,
    messenger_echo,
    messenger_feed_change,
    messenger_postback,
    messenger_quick_reply,
    messenger_read,
    messenger_referral,
    messenger_text,
    unknown_object,
    wa_account_update,
    wa_contacts,
    wa_image,
    wa_interactive_button_reply,
    wa_interactive_list_reply,
    wa_location,
    wa_media,
    wa_status,
    wa_template_button_reply,
    wa_text,
    wa_unsupported,
    wamid_for,
)

OUT = Path(__file__).resolve().parents[1] / "channels" / "fixtures" / "meta"

# Messenger: ms timestamps (ints); mids are opaque strings starting "m_".
T0 = 1718000000000
MID_TEXT = (
    "m_AG5Hz2Uq7tuwNEhXfYYKj8mJEM_QPpz5jdCK48PnKAjSdjfipqxqMvK8ma6AC8fplwlqLP_5cgXIbu7I3rBN0P"
)
MID_UNICODE = (
    "m_Bk7eT0lqR3fW9mYpZcXhUa1gNd2sVo6LjQyIr8KbHt4EwMuCxPz5FnDv0Ai3Ys7Ge9Jq2Ol1Rw8Tb6Mk4Xh"
)
MID_IMAGE = "m_Cd1fX9pQw2Le8NzRyT5uVb3kHs7aJm0gOi4WqEr6YtUp1AsDf8GhJk2Lz5XcVb9NmQw3Er7Ty1Ui4Op6As0D"
MID_ECHO = "m_Ee5rT8yU1iO4pA7sD0fG3hJ6kL9zX2cV5bN8mQ1wE4rT7yU0iO3pA6sD9fG2hJ5kL8zX1cV4bN7mQ0wE3rT"
MID_QR = "m_Ff2gH5jK8lZ1xC4vB7nM0qW3eR6tY9uI2oP5aS8dF1gH4jK7lZ0xC3vB6nM9qW2eR5tY8uI1oP4aS7dF0gH"
MID_POSTBACK = (
    "m_Gg9hJ2kL5zX8cV1bN4mQ7wE0rT3yU6iO9pA2sD5fG8hJ1kL4zX7cV0bN3mQ6wE9rT2yU5iO8pA1sD4fG7h"
)
WABA = "102290129340398"

# WhatsApp: second timestamps as strings; wamids derived from the number.
S0 = 1718000000
WAMID_IN = wamid_for(WA_ID, "3EB0A1B2C3D4E5F60718")
WAMID_OUT = wamid_for(WA_ID, "4C8F7E6D5C4B3A291807")


def _messenger() -> dict[str, Any]:
    text = messenger_text("Hi, where is my order #1234?", mid=MID_TEXT, timestamp=T0)
    qr = messenger_quick_reply(
        "Talk to a person", "HANDOFF", mid=MID_QR, timestamp=T0 + 4000, entry_time=T0 + 4100
    )
    echo = messenger_echo(
        "An agent will reply shortly.",
        app_id=APP_ID,
        metadata="omniroute:msg:42",
        mid=MID_ECHO,
        timestamp=T0 + 5000,
        entry_time=T0 + 5100,
    )
    read = messenger_read(T0 + 5000, timestamp=T0 + 9000, entry_time=T0 + 9100)
    return {
        "messenger_text": text,
        "messenger_text_unicode": messenger_text(
            "Grüße — 請幫我 🙂 <b>50% off</b> @support https://example.com/a",
            mid=MID_UNICODE,
            timestamp=T0 + 1000,
        ),
        "messenger_image": messenger_attachment(
            "image",
            url="https://scontent.xx.fbcdn.net/v/t1.15752-9/448_n.jpg?_nc_cat=1&ccb=1-7&oh=00_AfB&oe=66A0",
            mid=MID_IMAGE,
            timestamp=T0 + 2000,
        ),
        "messenger_file": messenger_attachment(
            "file",
            url="https://cdn.fbsbx.com/v/t59.2708-21/invoice.pdf/invoice.pdf?_nc_cat=1&oh=03_Q7&oe=66A0",
            mid=MID_IMAGE.replace("m_Cd", "m_Fi"),
            timestamp=T0 + 2100,
        ),
        "messenger_audio": messenger_attachment(
            "audio",
            url="https://cdn.fbsbx.com/v/t59.3654-21/audioclip-1718000002200.mp4?_nc_cat=1&oh=03_A1&oe=66A0",
            mid=MID_IMAGE.replace("m_Cd", "m_Au"),
            timestamp=T0 + 2200,
        ),
        "messenger_video": messenger_attachment(
            "video",
            url="https://video.xx.fbcdn.net/v/t42.3356-2/clip.mp4?_nc_cat=1&oh=00_V1&oe=66A0",
            mid=MID_IMAGE.replace("m_Cd", "m_Vi"),
            timestamp=T0 + 2300,
        ),
        "messenger_location": messenger_attachment(
            "location",
            lat=52.3676,
            long=4.9041,
            mid=MID_IMAGE.replace("m_Cd", "m_Lo"),
            timestamp=T0 + 2400,
        ),
        "messenger_fallback": messenger_attachment(
            "fallback",
            url="https://example.com/article",
            title="Example Domain",
            text="look at this https://example.com/article",
            mid=MID_IMAGE.replace("m_Cd", "m_Fb"),
            timestamp=T0 + 2500,
        ),
        "messenger_sticker": messenger_attachment(
            "sticker",
            url="https://scontent.xx.fbcdn.net/v/t39.1997-6/851557_369239266556155_759568595_n.png?_nc_cat=1&oh=00_S1&oe=66A0",
            mid=MID_IMAGE.replace("m_Cd", "m_St"),
            timestamp=T0 + 2600,
        ),
        "messenger_quick_reply": qr,
        "messenger_postback": messenger_postback(
            "Talk to an agent", "AGENT", mid=MID_POSTBACK, timestamp=T0 + 3000
        ),
        "messenger_get_started_referral": messenger_postback(
            "Get Started",
            "GET_STARTED",
            referral={"ref": "spring-sale", "source": "SHORTLINK", "type": "OPEN_THREAD"},
            mid=MID_POSTBACK.replace("m_Gg", "m_Gs"),
            timestamp=T0 + 3100,
        ),
        "messenger_referral": messenger_referral("spring-sale", timestamp=T0 + 3200),
        "messenger_echo": echo,
        "messenger_echo_page_inbox": messenger_echo(
            "Hi, this is Dana from support.",
            app_id=263902037430900,  # Page Inbox: a human answered outside our app
            mid=MID_ECHO.replace("m_Ee", "m_Pi"),
            timestamp=T0 + 6000,
        ),
        "messenger_standby_echo": as_standby(
            messenger_echo(
                "Bot reply from the app that owns the thread.",
                app_id=1111111111111111,
                mid=MID_ECHO.replace("m_Ee", "m_Sb"),
                timestamp=T0 + 6500,
            )
        ),
        "messenger_delivery": messenger_delivery([MID_ECHO], T0 + 5000, entry_time=T0 + 7000),
        "messenger_delivery_no_mids": messenger_delivery(None, T0 + 5000, entry_time=T0 + 7100),
        "messenger_read": read,
        "messenger_batched": batched(text, qr, echo, read),
        "messenger_batched_same_entry": batched(text, qr, same_entry=True),
        "messenger_feed_change": messenger_feed_change(entry_time=T0 + 8000),
    }


def _whatsapp() -> dict[str, Any]:
    text = wa_text("Hi, I need help with my order", wamid=WAMID_IN, timestamp=S0)
    delivered = wa_status(WAMID_OUT, "delivered", timestamp=S0 + 62)
    return {
        "whatsapp_text": text,
        "whatsapp_text_reply_context": wa_text(
            "Yes, that one",
            wamid=wamid_for(WA_ID, "3EB0A1B2C3D4E5F60719"),
            timestamp=S0 + 5,
            context={"from": "15550783881", "id": WAMID_OUT},
        ),
        "whatsapp_image": wa_image(
            "1043287463409218",
            mime_type="image/jpeg",
            sha256="B3mGm9OU2B8mX6hq7hrp7F2MjT4Z5pSAAOLqpHyDkjA=",
            caption="my receipt",
            wamid=wamid_for(WA_ID, "3EB0A1B2C3D4E5F60720"),
            timestamp=S0 + 10,
        ),
        "whatsapp_audio_voice": wa_media(
            "audio",
            "1002764438271669",
            mime_type="audio/ogg; codecs=opus",
            sha256="Y9vvGyeo3n76ptkXu3CwDBsnzbRFqpjHskQdMGSVqas=",
            voice=True,
            wamid=wamid_for(WA_ID, "3EB0A1B2C3D4E5F60721"),
            timestamp=S0 + 11,
        ),
        "whatsapp_document": wa_media(
            "document",
            "1219612649946680",
            mime_type="application/pdf",
            sha256="kQF9PNOiC0ICgogC8MWy3pWoQ2hBROMijol1hmcg8b0=",
            filename="invoice-1234.pdf",
            caption="the invoice",
            wamid=wamid_for(WA_ID, "3EB0A1B2C3D4E5F60722"),
            timestamp=S0 + 12,
        ),
        "whatsapp_interactive_button_reply": wa_interactive_button_reply(
            "agent",
            "Talk to an agent",
            context_id=WAMID_OUT,
            wamid=wamid_for(WA_ID, "3EB0A1B2C3D4E5F60723"),
            timestamp=S0 + 20,
        ),
        "whatsapp_interactive_list_reply": wa_interactive_list_reply(
            "billing",
            "Billing",
            "Invoices and payments",
            context_id=WAMID_OUT,
            wamid=wamid_for(WA_ID, "3EB0A1B2C3D4E5F60724"),
            timestamp=S0 + 21,
        ),
        "whatsapp_template_button_reply": wa_template_button_reply(
            "STOP",
            "Stop promotions",
            context_id=WAMID_OUT,
            wamid=wamid_for(WA_ID, "3EB0A1B2C3D4E5F60725"),
            timestamp=S0 + 22,
        ),
        "whatsapp_location": wa_location(
            37.483307,
            -122.148981,
            name="Pablo Morales",
            address="1 Hacker Way, Menlo Park, CA 94025",
            wamid=wamid_for(WA_ID, "3EB0A1B2C3D4E5F60726"),
            timestamp=S0 + 30,
        ),
        "whatsapp_contacts": wa_contacts(
            wamid=wamid_for(WA_ID, "3EB0A1B2C3D4E5F60727"), timestamp=S0 + 31
        ),
        "whatsapp_unsupported": wa_unsupported(
            "poll_creation", wamid=wamid_for(WA_ID, "3EB0A1B2C3D4E5F60728"), timestamp=S0 + 40
        ),
        "whatsapp_status_sent": wa_status(WAMID_OUT, "sent", timestamp=S0 + 60),
        "whatsapp_status_delivered": delivered,
        "whatsapp_status_read": wa_status(WAMID_OUT, "read", timestamp=S0 + 90),
        "whatsapp_status_failed": wa_status(
            wamid_for(WA_ID, "4C8F7E6D5C4B3A291808"), "failed", timestamp=S0 + 61
        ),
        "whatsapp_status_failed_undeliverable": wa_status(
            wamid_for("15550001111", "4C8F7E6D5C4B3A291809"),
            "failed",
            recipient_id="15550001111",
            error_code=131026,
            timestamp=S0 + 63,
        ),
        "whatsapp_batched": batched(text, delivered),
        "whatsapp_account_update": wa_account_update(waba_id=WABA),
    }


def fixtures() -> dict[str, Any]:
    return {**_messenger(), **_whatsapp(), "unknown_object": unknown_object()}


def _render(payload: Any) -> str:
    return json.dumps(payload, indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if a file is stale")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    out: Path = args.out
    stale: list[str] = []
    if not args.check:
        out.mkdir(parents=True, exist_ok=True)
    for name, payload in fixtures().items():
        path = out / f"{name}.json"
        text = _render(payload)
        if args.check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(path.name)
            continue
        path.write_text(text, encoding="utf-8")
    if stale:
        print("stale fixtures: " + ", ".join(stale), file=sys.stderr)
        return 1
    if not args.check:
        print(f"wrote {len(fixtures())} fixtures to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
