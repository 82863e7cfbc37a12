"""The ranking page: people order the SFT model's K sampled answers, best to worst.

A Serve application of its own, at /rank/ next to the chat page (`rlhf-ray compare-data` with
labeler 'human' deploys it alone; `rlhf-ray serve` adds it when the run has candidates; its name and route: serve/deployment.py):

    GET  /rank/                    the page (serve/rank.html)
    GET  /rank/api/next?labeler=L  the prompt L should rank next, with progress
    POST /rank/api/rankings        {prompt_id, labeler, order: [best..worst], unacceptable: [...]}
    GET  /rank/api/progress        how many prompts are ranked, of how many

Every ranking goes through `ComparisonStore`, which appends under a file lock and refuses a second
ranking of the same prompt (409), so people ranking at once never lose or duplicate a record.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve as ray_serve

from rlhf_ray.compare.store import AlreadyRanked, ComparisonStore, RankingError
from serve.protocol import error, read_api_key, refusal, validation_message

PAGE = Path(__file__).with_name("rank.html")
LABELER_ID = r"^[\w.@+-]{1,64}$"

rank_api = FastAPI(title="rlhf-ray ranking", docs_url=None, redoc_url=None)


class RankingBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt_id: str
    labeler: str = Field(pattern=LABELER_ID)
    order: list[int] = Field(description="The responses' indices, best first; each exactly once.")
    unacceptable: list[int] = Field(default_factory=list, description="Indices marked unacceptable.")


# RankingPage is pickled as it is defined (ray_serve.ingress), so what it uses is defined above.
@ray_serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0})
@ray_serve.ingress(rank_api)
class RankingPage:
    def __init__(self, folder: str, lease_s: float, api_key_env: str | None) -> None:
        self.store = ComparisonStore(Path(folder), lease_s)
        self.api_key = read_api_key(api_key_env)

    async def run(self, fn: Any, *args: Any) -> Any:
        """A store call off the event loop; no candidates yet is a 404 that says so."""
        try:
            return await asyncio.to_thread(fn, *args)
        except FileNotFoundError as e:
            return error(404, str(e))

    @rank_api.get("/", response_class=HTMLResponse)
    async def page(self) -> str:
        return PAGE.read_text(encoding="utf-8")

    @rank_api.get("/api/progress")
    async def progress(self, request: Request, labeler: str | None = None) -> Any:
        return refusal(self.api_key, request) or await self.run(self.store.progress, labeler)

    @rank_api.get("/api/next")
    async def next_prompt(self, request: Request, labeler: str = "") -> Any:
        if (refused := refusal(self.api_key, request)) is not None:
            return refused
        if not re.fullmatch(LABELER_ID, labeler):
            return error(400, f"labeler: {labeler!r} is not a labeler id (1-64 letters, digits, "
                           "or . _ @ + -; say who you are with ?labeler=your-name)")
        candidate = await self.run(self.store.next_for, labeler)
        if isinstance(candidate, JSONResponse):
            return candidate
        progress = await self.run(self.store.progress, labeler)
        if candidate is None:
            return {"done": True, "progress": progress}
        return {"done": False, "progress": progress, "prompt_id": candidate.id,
                "prompt": [m.model_dump() for m in candidate.prompt],
                "responses": candidate.responses}

    @rank_api.post("/api/rankings")
    async def submit(self, request: Request) -> Any:
        if (refused := refusal(self.api_key, request)) is not None:
            return refused
        try:
            body = RankingBody.model_validate_json(await request.body())
        except ValidationError as e:
            return error(400, validation_message(e)[0])
        try:
            record = await self.run(self.store.submit, body.prompt_id, body.order, body.labeler,
                                    body.unacceptable)
        except AlreadyRanked as e:
            return error(409, str(e))
        except RankingError as e:
            return error(400, str(e))
        if isinstance(record, JSONResponse):
            return record
        progress = await self.run(self.store.progress, body.labeler)
        return {"recorded": record.model_dump(mode="json", include={"id", "labeler", "time"}),
                "progress": progress}


def app_builder(args: dict[str, Any]) -> ray_serve.Application:
    """The ranking page of `args["folder"]` (a run's compare/), for a Serve config."""
    return RankingPage.bind(str(args["folder"]), float(args.get("lease_s", 600.0)),
                            args.get("api_key_env"))
