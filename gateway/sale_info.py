"""``GET /v1/sales/{sale}``: a sale's public information (from :mod:`gateway.catalog`)."""

from __future__ import annotations

from aiohttp import web

from gateway.catalog import sale_summary
from gateway.http import json_response


async def sale_info(request: web.Request) -> web.Response:
    body = await sale_summary(request, request.match_info["sale"])
    return json_response(body, headers={"Cache-Control": "max-age=1"})


def setup(app: web.Application) -> None:
    app.router.add_get("/v1/sales/{sale}", sale_info)
