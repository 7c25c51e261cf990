import httpx

from fastapi_sse.testing import live_server, open_event_stream

from .minimal import app


def test_order_shipped_reaches_the_subscriber() -> None:
    with (
        live_server(app) as url,
        open_event_stream(url + "/subscribe", params={"channel": "order:17"}) as events,
    ):
        # The stream is subscribed once open_event_stream returns: publish now.
        httpx.post(url + "/orders/17/ship")
        # Wait by reading: the client's read timeout is the deadline.
        assert events.next_event("orderShipped").json() == {"orderId": "17"}
