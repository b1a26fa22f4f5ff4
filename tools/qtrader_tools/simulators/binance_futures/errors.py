"""Binance's error answers: an HTTP status plus a ``{"code", "msg"}`` body.

The messages are Binance's own wording (USD-M futures error-code list), so a client that matches
on text as well as on codes sees what it would see in production.
"""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    """A request the simulated exchange refuses; becomes the HTTP answer as is."""

    def __init__(self, status: int, code: int, msg: str, *, retry_after_s: int | None = None):
        super().__init__(f"{status} {code} {msg}")
        self.status = status
        self.code = code
        self.msg = msg
        self.retry_after_s = retry_after_s  # sent as Retry-After (429 and 418)

    def body(self) -> dict[str, Any]:
        return {"code": self.code, "msg": self.msg}


def bad_request(code: int, msg: str) -> ApiError:
    return ApiError(400, code, msg)


def mandatory(name: str) -> ApiError:
    return bad_request(
        -1102, f"Mandatory parameter '{name}' was not sent, was empty/null, or malformed."
    )


def illegal_chars(name: str) -> ApiError:
    return bad_request(
        -1100,
        f"Illegal characters found in parameter '{name}'; legal range is "
        "'^([0-9]{1,20})(\\.[0-9]{1,20})?$'.",
    )


def invalid_value(name: str) -> ApiError:
    return bad_request(-1130, f"Data sent for parameter '{name}' is not valid.")


def not_required(name: str) -> ApiError:
    return bad_request(-1106, f"Parameter '{name}' sent when not required.")


# Error codes that are answered with a fixed message.
INVALID_SYMBOL = (-1121, "Invalid symbol.")
INVALID_SIDE = (-1117, "Invalid side.")
INVALID_ORDER_TYPE = (-1116, "Invalid orderType.")
INVALID_TIF = (-1115, "Invalid timeInForce.")
INVALID_RESP_TYPE = (-1136, "Invalid newOrderRespType.")
BAD_PRECISION = (-1111, "Precision is over the maximum defined for this asset.")
PRICE_NOT_POSITIVE = (-4001, "Price less than or equal to zero.")
PRICE_ABOVE_MAX = (-4002, "Price greater than max price.")
QTY_NOT_POSITIVE = (-4003, "Quantity less than or equal to zero.")
QTY_BELOW_MIN = (-4004, "Quantity less than min quantity.")
QTY_ABOVE_MAX = (-4005, "Quantity greater than max quantity.")
PRICE_BELOW_MIN = (-4013, "Price less than min price.")
PRICE_OFF_TICK = (-4014, "Price not increased by tick size.")
CLIENT_ID_INVALID = (-4015, "Client order id is not valid.")
QTY_OFF_STEP = (-4023, "Qty not increased by step size.")
CLIENT_ID_DUPLICATE = (-4116, "ClientOrderId is duplicated.")
MARGIN_INSUFFICIENT = (-2019, "Margin is insufficient.")
REDUCE_ONLY_REJECTED = (-2022, "ReduceOnly Order is rejected.")
NO_SUCH_ORDER = (-2013, "Order does not exist.")
CANCEL_REJECTED = (-2011, "Unknown order sent.")
DUPLICATE_PARAM = (-1101, "Duplicate values for a parameter detected.")
INVALID_SIGNATURE = (-1022, "Signature for this request is not valid.")
TIMESTAMP_OUTSIDE = (-1021, "Timestamp for this request is outside of the recvWindow.")
TIMESTAMP_AHEAD = (-1021, "Timestamp for this request was 1000ms ahead of the server's time.")
API_KEY_FORMAT = (-2014, "API-key format invalid.")
API_KEY_REJECTED = (-2015, "Invalid API-key, IP, or permissions for action.")


def rejected(error: tuple[int, str], status: int = 400) -> ApiError:
    return ApiError(status, error[0], error[1])
