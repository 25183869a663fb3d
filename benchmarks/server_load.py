"""Safety under load: many concurrent streams, some clients vanishing, bursts of bad requests.

Against a running server (`thrifty serve ...`):
    python benchmarks/server_load.py --base-url http://127.0.0.1:8000 [--api-key KEY]

Every well-formed request asks for an exact number of tokens (ignore_eos), so its usage can be
checked exactly. A fifth of the streaming clients close their stream after a few chunks.
Between them, bursts of malformed requests must each get a 4xx. /health is polled throughout.
Prints one JSON line; tests/test_server.py runs the same function and asserts on it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time

import httpx2 as httpx
import openai

_WORDS = "the a river mountain light quiet engine paper garden music window cloud seven blue".split()

# Each must be answered with a 4xx, never a 5xx (nor accepted).
MALFORMED = [
    (b"{not json", "application/json"),
    (b"[1, 2, 3]", "application/json"),
    (json.dumps({"prompt": "hi", "max_tokens": "many"}).encode(), "application/json"),
    (json.dumps({"prompt": "hi", "temperature": -1}).encode(), "application/json"),
    (json.dumps({"prompt": "hi", "max_tokens": 10 ** 9}).encode(), "application/json"),
    (json.dumps({"prompt": [10 ** 9]}).encode(), "application/json"),
    (json.dumps({"prompt": ""}).encode(), "application/json"),
    (json.dumps({"model": "no-such-model", "prompt": "hi"}).encode(), "application/json"),
    (json.dumps({"max_tokens": 5}).encode(), "application/json"),
]


def _prompt(rng: random.Random) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 40)))


async def run_load(base_url: str, api_key: str = "none", num_requests: int = 200, disconnect_frac: float = 0.2,
                   max_tokens: tuple[int, int] = (4, 24), malformed_bursts: int = 10, seed: int = 0) -> dict:
    rng = random.Random(seed)
    client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key=api_key, max_retries=0, timeout=600)
    model = (await client.models.list()).data[0].id
    headers = {"Authorization": f"Bearer {api_key}"}
    http = httpx.AsyncClient(base_url=base_url, headers=headers, timeout=60)
    # Exact prompt token counts, from the server's own tokenizer.
    prompts = [_prompt(rng) for _ in range(num_requests)]
    wanted = [rng.randint(*max_tokens) for _ in range(num_requests)]
    leaves = set(rng.sample(range(num_requests), int(num_requests * disconnect_frac)))
    expected_prompt = [(await http.post("/tokenize", json={"prompt": p})).json()["count"] for p in prompts]

    result = {"requests": num_requests, "completed": 0, "disconnected": 0, "failures": 0, "usage_mismatches": 0,
              "malformed_sent": 0, "malformed_4xx": 0, "status_5xx": 0, "health_checks": 0, "health_not_200": 0}
    errors: list[str] = []
    done = asyncio.Event()

    async def one(i: int) -> None:
        try:
            stream = await client.completions.create(
                model=model, prompt=prompts[i], max_tokens=wanted[i], temperature=0.8, seed=i, stream=True,
                stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
            text, usage, chunks = "", None, 0
            async for chunk in stream:
                chunks += 1
                if chunk.choices:
                    text += chunk.choices[0].text
                if chunk.usage is not None:
                    usage = chunk.usage
                if i in leaves and chunks >= 2:
                    await stream.close()  # the client goes away mid-stream
                    result["disconnected"] += 1
                    return
            if i in leaves:
                result["disconnected"] += 1  # it finished before it could leave
                return
            if (usage is None or usage.completion_tokens != wanted[i] or usage.prompt_tokens != expected_prompt[i]
                    or usage.total_tokens != wanted[i] + expected_prompt[i]):
                result["usage_mismatches"] += 1
                errors.append(f"request {i}: usage {usage}, wanted {wanted[i]} + {expected_prompt[i]}")
            result["completed"] += 1
        except openai.APIStatusError as e:
            result["failures"] += 1
            result["status_5xx"] += e.status_code >= 500
            errors.append(f"request {i}: {e.status_code} {e.message}")
        except Exception as e:  # noqa: BLE001 - every failure is counted, none ends the run
            result["failures"] += 1
            errors.append(f"request {i}: {e!r}")

    async def malformed() -> None:
        for _ in range(malformed_bursts):
            await asyncio.sleep(rng.uniform(0.0, 1.0))
            for body, ctype in MALFORMED:
                r = await http.post("/v1/completions", content=body, headers={"Content-Type": ctype})
                result["malformed_sent"] += 1
                result["malformed_4xx"] += 400 <= r.status_code < 500
                result["status_5xx"] += r.status_code >= 500

    async def health() -> None:
        while not done.is_set():
            r = await http.get("/health")
            result["health_checks"] += 1
            result["health_not_200"] += r.status_code != 200
            await asyncio.sleep(0.2)

    start = time.perf_counter()
    health_task = asyncio.create_task(health())
    await asyncio.gather(malformed(), *(one(i) for i in range(num_requests)))
    result["duration_s"] = round(time.perf_counter() - start, 2)
    done.set()
    await health_task
    await http.aclose()
    await client.close()
    result["errors"] = errors[:10]
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--api-key", default="none")
    p.add_argument("--num-requests", type=int, default=200)
    p.add_argument("--disconnect-frac", type=float, default=0.2)
    args = p.parse_args()
    print(json.dumps(asyncio.run(run_load(args.base_url, args.api_key, args.num_requests, args.disconnect_frac))))


if __name__ == "__main__":
    main()
