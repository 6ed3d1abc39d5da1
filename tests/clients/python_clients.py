"""Ollama's and OpenAI's official Python clients, unchanged, against `phi4 serve`.

Usage: python_clients.py BASE_URL   (e.g. http://127.0.0.1:11434). Exits non-zero on a failure.
"""
import json
import sys
from typing import List, Literal

import ollama
import openai
from pydantic import BaseModel, Field

base = sys.argv[1]
client = ollama.Client(host=base)
question = [{"role": "user", "content": "How do I open a file in Python?"}]
opts = {"num_predict": 16, "temperature": 0}

# Chat, streamed and not: the same greedy reply.
chunks = list(client.chat(model="phi4", messages=question, stream=True, options=opts))
assert chunks[-1].done and chunks[-1].done_reason in ("stop", "length"), chunks[-1]
streamed = "".join(c.message.content for c in chunks)
whole = client.chat(model="phi4", messages=question, options=opts)
assert whole.message.role == "assistant" and whole.message.content == streamed, (whole, streamed)
assert whole.eval_count > 0 and whole.total_duration > 0

# A second turn re-sends the history: only the new turn is evaluated.
history = question + [{"role": "assistant", "content": whole.message.content}, {"role": "user", "content": "And close it?"}]
second = client.chat(model="phi4", messages=history, options=opts)
first = chunks[-1].prompt_eval_count
assert second.prompt_eval_count <= 24, (first, second.prompt_eval_count)
print(f"ollama chat: first turn {first} prompt tokens, second turn {second.prompt_eval_count}")

# Generate, streamed and not.
parts = list(client.generate(model="phi4", prompt="What is a list?", stream=True, options=opts))
assert parts[-1].done and parts[-1].context, parts[-1]
gen = client.generate(model="phi4", prompt="What is a list?", options=opts)
assert gen.response == "".join(p.response for p in parts)

# List, show, ps.
models = client.list().models
assert [m.model for m in models] == ["phi4:latest"], models
shown = client.show("phi4")
assert shown.modelinfo["general.architecture"] == "phi3" and "completion" in shown.capabilities, shown
assert client.ps().models[0].model == "phi4:latest"

# An unknown model is the client's own error type, with the status.
try:
    client.chat(model="llama3", messages=question)
    raise AssertionError("no error for an unknown model")
except ollama.ResponseError as e:
    assert e.status_code == 404 and "not found" in e.error, e

# Structured output: a pydantic model's schema as `format`; the reply parses into the model,
# at any temperature.
class Reading(BaseModel):
    sensor: Literal["temperature", "humidity", "pressure"]
    value: int = Field(ge=-40, le=125)
    alarm: bool
    notes: List[Literal["stale", "spike", "drift"]] = Field(max_length=2)

ask = [{"role": "user", "content": "Report the sensor reading as JSON."}]
for seed, temperature in [(1, 0.0), (2, 0.8), (3, 1.2)]:
    r = client.chat(model="phi4", messages=ask, format=Reading.model_json_schema(), options={"seed": seed, "temperature": temperature, "num_predict": 200})
    assert r.done_reason == "stop", r
    reading = Reading.model_validate_json(r.message.content)
print(f"ollama format=<pydantic schema>: {reading!r}")
g = client.generate(model="phi4", prompt="A JSON object, please.", format="json", options={"num_predict": 200, "temperature": 0})
if g.done_reason == "stop":
    assert isinstance(json.loads(g.response), dict), g.response
else:
    assert g.response.startswith("{"), g.response
try:
    client.chat(model="phi4", messages=ask, format={"type": "integer", "minimum": 3, "maximum": 1})
    raise AssertionError("no error for a schema that cannot be satisfied")
except ollama.ResponseError as e:
    assert e.status_code == 400 and "schema" in e.error, e

# OpenAI's client against the same server.
oa = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
done = oa.chat.completions.create(model="phi4", messages=question, max_tokens=8, temperature=0)
assert done.choices[0].message.role == "assistant" and done.usage.completion_tokens == 8, done
stream = oa.chat.completions.create(model="phi4", messages=question, max_tokens=8, temperature=0, stream=True, stream_options={"include_usage": True})
events = list(stream)
text = "".join(e.choices[0].delta.content or "" for e in events if e.choices)
assert text == done.choices[0].message.content, (text, done.choices[0].message.content)
assert events[-1].usage.completion_tokens == 8
assert [m.id for m in oa.models.list()] == ["phi4:latest"]
try:
    oa.chat.completions.create(model="gpt-4o", messages=question)
    raise AssertionError("no error for an unknown model")
except openai.NotFoundError as e:
    assert "not found" in str(e), e
# OpenAI's structured output: parse() sends the pydantic model as a strict json_schema.
for seed in (1, 2):
    parsed = oa.chat.completions.parse(model="phi4", messages=ask, response_format=Reading, temperature=0.9, seed=seed, max_tokens=200)
    assert isinstance(parsed.choices[0].message.parsed, Reading), parsed
print(f"openai response_format=<pydantic model>: {parsed.choices[0].message.parsed!r}")
obj = oa.chat.completions.create(model="phi4", messages=ask, response_format={"type": "json_object"}, temperature=0, max_tokens=200)
if obj.choices[0].finish_reason == "stop":
    assert isinstance(json.loads(obj.choices[0].message.content), dict), obj
# Embeddings through both clients (OpenAI's asks for base64 unless told otherwise).
texts = ["What is a tuple?", "How do I open a file?"]
emb = client.embed(model="phi4", input=texts).embeddings
assert len(emb) == 2 and abs(sum(x * x for x in emb[0]) - 1) < 1e-3, len(emb)
legacy = client.embeddings(model="phi4", prompt=texts[0]).embedding
assert len(legacy) == len(emb[0])
vectors = oa.embeddings.create(model="phi4", input=texts).data
assert [v.index for v in vectors] == [0, 1]
assert max(abs(a - b) for a, b in zip(vectors[0].embedding, emb[0])) < 1e-6
floats = oa.embeddings.create(model="phi4", input=texts[1], encoding_format="float").data[0].embedding
assert max(abs(a - b) for a, b in zip(floats, emb[1])) < 1e-6
# LlamaIndex's Ollama client sends its unset options as null; LangChain's, options Ollama has.
nulls = client.chat(model="phi4:14b", messages=question, options={"temperature": None, "num_predict": 2, "mirostat": 1})
assert nulls.eval_count == 2, nulls
# Tools: OpenAI's shapes of a call and its result, 30 required calls, every one valid for the
# tool's schema (checked here, independently of the server; tests/serve.rs makes 100 through each
# API).
weather = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                          "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"]}}}


def valid(args):
    return (isinstance(args, dict) and set(args) == {"city", "unit"} and isinstance(args["city"], str)
            and len(args["city"]) <= 30 and args["unit"] in ("celsius", "fahrenheit"))


where = [{"role": "user", "content": "What is the weather in Paris?"}]
ok_openai = 0
for seed in range(30):
    c = oa.chat.completions.create(model="phi4", messages=where, tools=[weather], tool_choice="required", temperature=1.0, seed=seed, max_tokens=200)
    call = c.choices[0].message.tool_calls[0]
    ok_openai += int(c.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather" and valid(json.loads(call.function.arguments)))
assert ok_openai == 30, ok_openai
print(f"openai tools: {ok_openai} of 30 calls valid")
follow = where + [c.choices[0].message.model_dump(exclude_none=True), {"role": "tool", "tool_call_id": call.id, "content": "21 degrees"}]
answer = oa.chat.completions.create(model="phi4", messages=follow, tools=[weather], max_tokens=8, temperature=0)
assert answer.choices[0].message.tool_calls is None and answer.usage.prompt_tokens_details.cached_tokens > 0, answer
scored = oa.chat.completions.create(model="phi4", messages=question, logprobs=True, top_logprobs=3, max_tokens=6, temperature=0)
lp = scored.choices[0].logprobs.content
# (The reported probabilities are the model's, before the default repeat penalty that greedy
# decoding here still applies: the chosen token is among the likeliest, not always the first.)
assert len(lp) == 6 and all(t.logprob <= 0 and (t.token in [a.token for a in t.top_logprobs] or t.logprob <= t.top_logprobs[-1].logprob) for t in lp), lp
r = client.chat(model="phi4", messages=question, logprobs=True, top_logprobs=2, options={"num_predict": 4, "temperature": 0, "repeat_penalty": 1})
assert len(r.logprobs) == 4 and r.logprobs[0].top_logprobs[0].logprob == r.logprobs[0].logprob, r
# The Responses API through the official client.
resp = oa.responses.create(model="phi4", input="What is a list?", instructions="Be brief.", max_output_tokens=8, temperature=0)
assert resp.status == "incomplete" and resp.output_text, resp
with oa.responses.stream(model="phi4", input="What is a list?", instructions="Be brief.", max_output_tokens=8, temperature=0) as stream:
    streamed = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
assert streamed == resp.output_text, (streamed, resp.output_text)
tool = {"type": "function", "name": "get_weather", "description": "The weather in a city.", "parameters": weather["function"]["parameters"]}
resp = oa.responses.create(model="phi4", input="Weather in Paris?", tools=[tool], tool_choice="required", max_output_tokens=200, temperature=0)
fc = next(i for i in resp.output if i.type == "function_call")
assert valid(json.loads(fc.arguments)), fc
resp = oa.responses.create(model="phi4", input=[{"role": "user", "content": "Weather in Paris?"}, fc.model_dump(exclude_none=True),
                           {"type": "function_call_output", "call_id": fc.call_id, "output": "21 degrees"}], tools=[tool], max_output_tokens=8, temperature=0)
assert resp.output[0].type == "message", resp
print("python clients: ok")
