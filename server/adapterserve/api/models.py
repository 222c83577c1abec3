"""GET /v1/models and GET /v1/models/{id}: the base and every servable adapter the key may use."""

from __future__ import annotations

from fastapi import APIRouter, Request

from adapterserve.errors import model_not_found

from .middleware import context_of
from .serving import fine_tuned_owners, key_may_use

router = APIRouter()


def visible_cards(raw_request: Request):
    """The cards the request's key may use (all of them without a keys file)."""
    host, key = raw_request.app.state.host, context_of(raw_request).key
    if key is None:
        return host.model_cards()
    owners = fine_tuned_owners(raw_request)  # one read for every card (a store may list thousands)
    return [card for card in host.model_cards() if key_may_use(raw_request, key, card.id, host.base_name, owners)]


@router.get("/v1/models")
async def list_models(raw_request: Request):
    return {"object": "list", "data": [card.as_openai() for card in visible_cards(raw_request)]}


@router.get("/v1/models/{model_id:path}")
async def retrieve_model(model_id: str, raw_request: Request):
    for card in visible_cards(raw_request):
        if card.id == model_id:
            return card.as_openai()
    raise model_not_found(model_id)
