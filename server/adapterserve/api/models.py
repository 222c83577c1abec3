"""GET /v1/models and GET /v1/models/{id}: the base and every servable adapter."""

from __future__ import annotations

from fastapi import APIRouter, Request

from adapterserve.api.errors import model_not_found

router = APIRouter()


@router.get("/v1/models")
async def list_models(raw_request: Request):
    cards = raw_request.app.state.host.model_cards()
    return {"object": "list", "data": [card.as_openai() for card in cards]}


@router.get("/v1/models/{model_id:path}")
async def retrieve_model(model_id: str, raw_request: Request):
    for card in raw_request.app.state.host.model_cards():
        if card.id == model_id:
            return card.as_openai()
    raise model_not_found(model_id)
