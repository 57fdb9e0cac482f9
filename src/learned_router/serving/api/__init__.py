"""The HTTP endpoints, one router a resource: chat completions, routing decisions, feedback, drift, quality, admin, operations."""

from fastapi import APIRouter

from . import admin, chat, drift, feedback, ops, quality, route

ROUTERS = (chat.router, route.router, feedback.router, drift.router, quality.router, admin.router, ops.router)
ENDPOINTS = frozenset(r.path for router in ROUTERS for r in router.routes)  # request metrics name these paths

api_router = APIRouter()
for included in ROUTERS:
    api_router.include_router(included)
