"""The request guard every unary RPC passes through: validate, run, map errors.

A grpc.aio server interceptor cannot see the request, so this one returns a wrapped method handler
(the documented way to see requests in Python). Order of work for each call:
1. the request is checked against its protovalidate rules (INVALID_ARGUMENT + BadRequest);
2. the handler runs;
3. a DomainError leaves as its status with ErrorInfo; a failed downstream call becomes UNAVAILABLE or
   INTERNAL; any other exception becomes INTERNAL with an opaque incident id that is in the log and the
   trace, and nothing else (no stack trace, no SQL) reaches the caller.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeAlias, cast

import grpc
import grpc.aio
from opentelemetry import trace

from runtime.errors import DomainError, Internal
from runtime.protos import RpcContext
from runtime.status import abort, from_rpc_error
from runtime.validation import RequestValidator

log = logging.getLogger("coins.rpc")

Behavior = Callable[[Any, RpcContext], Awaitable[Any]]
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"


class RequestGuard(grpc.aio.ServerInterceptor):
    def __init__(self, error_domain: str, validator: RequestValidator | None = None) -> None:
        self._domain = error_domain
        self._validator = validator or RequestValidator()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        return grpc.unary_unary_rpc_method_handler(
            self._guard(cast(Behavior, handler.unary_unary), handler_call_details.method),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _guard(self, behavior: Behavior, method: str) -> Behavior:
        async def guarded(request: Any, context: RpcContext) -> Any:
            try:
                self._validator.check(request)
                return await behavior(request, context)
            except DomainError as error:
                await abort(context, error, self._domain)
            except grpc.aio.AbortError:
                raise
            except grpc.RpcError as error:
                dependency = getattr(error, "dependency", "downstream")
                await abort(context, from_rpc_error(error, dependency=dependency), self._domain)
            except Exception as error:
                incident = uuid.uuid4().hex
                span = trace.get_current_span()
                span.record_exception(error)
                span.set_attribute("coins.incident_id", incident)
                log.exception("incident %s in %s", incident, method)
                await abort(
                    context,
                    Internal(
                        "INTERNAL_ERROR",
                        f"internal error; quote incident {incident} to the operators",
                        incident_id=incident,
                    ),
                    self._domain,
                )

        return guarded
