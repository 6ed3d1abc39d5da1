"""The frameworks users build agents and RAG apps with, unchanged, against `phi4 serve` on the
demo model (started with --tool-choice alternate: the demo model calls a tool after each user
message and answers after the results, which real Phi-4 decides on its own). Each call is checked
for what the framework hands back; a table of client x call x result is printed, and any failure
fails the run. Usage: frameworks.py BASE_URL (pinned versions: frameworks.txt)."""

import asyncio
import json
import sys
import traceback

BASE = sys.argv[1].rstrip("/")
MODEL = "phi4"
results = []


def check(client, call):
    def run(fn):
        try:
            detail = fn()
            results.append((client, call, "ok", detail or ""))
        except Exception as e:  # noqa: BLE001 - every failure is reported in the table
            traceback.print_exc()
            results.append((client, call, "FAIL", f"{type(e).__name__}: {e}"[:200]))
        return fn

    return run


from typing import Annotated  # noqa: E402

from pydantic import Field  # noqa: E402

# The demo model writes on inside a string until something stops it: the tools' schemas bound
# their strings, as a careful tool author's do.
City = Annotated[str, Field(max_length=30, description="The city's name.")]


def get_weather(city: City) -> str:
    """The current weather in a city."""
    return f"It is 21 degrees and sunny in {city}."


# LangChain ------------------------------------------------------------------------------------
from langchain_core.messages import HumanMessage, ToolMessage  # noqa: E402
from langchain_core.tools import tool as lc_tool  # noqa: E402
from langchain_ollama import ChatOllama, OllamaEmbeddings  # noqa: E402
from langchain_openai import ChatOpenAI, OpenAIEmbeddings  # noqa: E402


@lc_tool
def weather(city: City) -> str:
    """The current weather in a city."""
    return get_weather(city)


# (Ollama's Python client keeps only type, description, enum and items of a parameter's
# schema, so a string's bound never reaches the server through it: its tools leave them out.)
@lc_tool("weather")
def weather_unbounded(city: str) -> str:
    """The current weather in a city."""
    return get_weather(city)


def lc_agent_loop(llm, weather=weather):
    """Tool call -> tool result -> answer, as LangChain agents do it."""
    bound = llm.bind_tools([weather])
    msgs = [HumanMessage("What is the weather in Paris?")]
    ai = bound.invoke(msgs)
    assert ai.tool_calls, f"no tool call: {ai}"
    call = ai.tool_calls[0]
    assert call["name"] == "weather" and isinstance(call["args"].get("city"), str), call
    msgs += [ai, ToolMessage(weather.invoke(call["args"]), tool_call_id=call["id"])]
    answer = bound.invoke(msgs)
    assert not answer.tool_calls and isinstance(answer.content, str), answer
    return f"called weather({call['args']}), then answered {len(answer.content)} chars"


ollama_llm = ChatOllama(model=MODEL, base_url=BASE, num_predict=256, temperature=0)


@check("langchain-ollama ChatOllama", "invoke")
def _():
    r = ChatOllama(model=MODEL, base_url=BASE, num_predict=16).invoke("What is a list?")
    assert r.content and r.usage_metadata["output_tokens"] > 0, r
    return f"{len(r.content)} chars"


@check("langchain-ollama ChatOllama", "stream")
def _():
    chunks = list(ChatOllama(model=MODEL, base_url=BASE, num_predict=16).stream("What is a list?"))
    assert len(chunks) > 1 and "".join(c.content for c in chunks), chunks
    return f"{len(chunks)} chunks"


@check("langchain-ollama ChatOllama", "bind_tools agent loop")
def _():
    return lc_agent_loop(ollama_llm, weather_unbounded)


@check("langchain-ollama OllamaEmbeddings", "embed_documents / embed_query")
def _():
    e = OllamaEmbeddings(model=MODEL, base_url=BASE)
    docs = e.embed_documents(["A list is mutable.", "A tuple is not."])
    q = e.embed_query("What is a list?")
    assert len(docs) == 2 and len(docs[0]) == len(q) > 0
    return f"2 + 1 vectors of {len(q)}"


openai_llm = ChatOpenAI(model=MODEL, base_url=f"{BASE}/v1", api_key="unused", max_tokens=256, temperature=0)


@check("langchain-openai ChatOpenAI", "invoke / stream")
def _():
    llm = ChatOpenAI(model=MODEL, base_url=f"{BASE}/v1", api_key="unused", max_tokens=16)
    r = llm.invoke("What is a list?")
    chunks = list(llm.stream("What is a list?"))
    assert r.content and len(chunks) > 1
    return f"{len(r.content)} chars, {len(chunks)} chunks"


@check("langchain-openai ChatOpenAI", "bind_tools agent loop")
def _():
    return lc_agent_loop(openai_llm)


@check("langchain-openai ChatOpenAI", "with_structured_output")
def _():
    from pydantic import BaseModel, Field

    class City(BaseModel):
        name: str = Field(max_length=20)
        population: int

    out = openai_llm.with_structured_output(City, method="json_schema").invoke("Name a city.")
    assert isinstance(out, City), out
    return repr(out)[:60]


@check("langchain-openai OpenAIEmbeddings", "embed_query")
def _():
    e = OpenAIEmbeddings(model=MODEL, base_url=f"{BASE}/v1", api_key="unused", check_embedding_ctx_length=False)
    v = e.embed_query("What is a list?")
    assert len(v) > 0
    return f"a vector of {len(v)}"


# LlamaIndex -----------------------------------------------------------------------------------
from llama_index.core.llms import ChatMessage  # noqa: E402
from llama_index.core.tools import FunctionTool  # noqa: E402
from llama_index.embeddings.ollama import OllamaEmbedding  # noqa: E402
from llama_index.llms.ollama import Ollama as LlamaOllama  # noqa: E402


@check("llama-index Ollama", "complete / chat / stream_chat (default settings)")
def _():
    llm = LlamaOllama(model=MODEL, base_url=BASE, request_timeout=120, additional_kwargs={"num_predict": 16})
    c = llm.complete("What is a list?")
    r = llm.chat([ChatMessage(role="user", content="What is a list?")])
    s = list(llm.stream_chat([ChatMessage(role="user", content="What is a list?")]))
    assert c.text and r.message.content and s
    return f"{len(c.text)} / {len(r.message.content)} chars, {len(s)} chunks"


@check("llama-index Ollama", "chat_with_tools agent loop")
def _():
    llm = LlamaOllama(model=MODEL, base_url=BASE, request_timeout=120, temperature=0, additional_kwargs={"num_predict": 256})
    tool = FunctionTool.from_defaults(fn=get_weather)
    r = llm.chat_with_tools([tool], user_msg="What is the weather in Paris?")
    calls = llm.get_tool_calls_from_response(r, error_on_no_tool_call=True)
    result = tool(**calls[0].tool_kwargs)
    msgs = [ChatMessage(role="user", content="What is the weather in Paris?"), r.message,
            ChatMessage(role="tool", content=str(result), additional_kwargs={"tool_call_id": calls[0].tool_id, "tool_name": calls[0].tool_name})]
    answer = llm.chat_with_tools([tool], chat_history=msgs)
    assert not llm.get_tool_calls_from_response(answer, error_on_no_tool_call=False)
    return f"called {calls[0].tool_name}({calls[0].tool_kwargs}), then answered"


@check("llama-index OllamaEmbedding", "get_text_embedding / batch")
def _():
    e = OllamaEmbedding(model_name=MODEL, base_url=BASE)
    v = e.get_text_embedding("What is a list?")
    b = e.get_text_embedding_batch(["a", "b", "c"])
    assert len(v) > 0 and len(b) == 3
    return f"vectors of {len(v)}"


# LiteLLM --------------------------------------------------------------------------------------
import litellm  # noqa: E402

litellm.telemetry = False


@check("litellm", "completion ollama_chat/ and openai/ with tools")
def _():
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
              "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}}, "required": ["city"]}}}]
    r = litellm.completion(model=f"ollama_chat/{MODEL}", api_base=BASE, messages=[{"role": "user", "content": "What is a list?"}], max_tokens=16)
    assert r.choices[0].message.content
    r = litellm.completion(model=f"openai/{MODEL}", api_base=f"{BASE}/v1", api_key="unused", tools=tools,
                           messages=[{"role": "user", "content": "Weather in Paris?"}], max_tokens=256, temperature=0)
    call = r.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather" and "city" in json.loads(call.function.arguments)
    r = litellm.completion(model=f"ollama_chat/{MODEL}", api_base=BASE, tools=tools,
                           messages=[{"role": "user", "content": "Weather in Paris?"}], max_tokens=256, temperature=0)
    call2 = r.choices[0].message.tool_calls[0]
    assert call2.function.name == "get_weather"
    return f"text, then get_weather({call.function.arguments}) over both"


@check("litellm", "embedding ollama/")
def _():
    r = litellm.embedding(model=f"ollama/{MODEL}", api_base=BASE, input=["What is a list?"])
    assert len(r.data[0]["embedding"]) > 0
    return f"a vector of {len(r.data[0]['embedding'])}"


# instructor -----------------------------------------------------------------------------------
@check("instructor (default mode: tools)", "create(response_model=...)")
def _():
    import instructor
    from openai import OpenAI
    from pydantic import BaseModel, Field

    class Weather(BaseModel):
        city: str = Field(max_length=20)
        degrees: int

    client = instructor.from_openai(OpenAI(base_url=f"{BASE}/v1", api_key="unused"))
    w = client.chat.completions.create(model=MODEL, response_model=Weather, max_retries=0, max_tokens=256,
                                       messages=[{"role": "user", "content": "Paris is 21 degrees."}])
    assert isinstance(w, Weather)
    return repr(w)[:60]


# The OpenAI Agents SDK (Responses API) --------------------------------------------------------
@check("openai-agents Runner", "agent with a function tool (Responses API)")
def _():
    from agents import Agent, Runner, function_tool, set_default_openai_client, set_tracing_disabled
    from openai import AsyncOpenAI

    set_tracing_disabled(True)
    set_default_openai_client(AsyncOpenAI(base_url=f"{BASE}/v1", api_key="unused"), use_for_tracing=False)
    from agents import ModelSettings

    agent = Agent(name="weather", instructions="Answer with the tool's help.", model=MODEL,
                  tools=[function_tool(get_weather)], model_settings=ModelSettings(max_tokens=256, temperature=0))
    r = Runner.run_sync(agent, "What is the weather in Paris?")
    kinds = [i.type for i in r.new_items]
    assert "tool_call_item" in kinds and "tool_call_output_item" in kinds, kinds
    assert isinstance(r.final_output, str)
    return f"items {kinds}"


# Anthropic ------------------------------------------------------------------------------------
@check("anthropic SDK", "messages.create / stream / tool_use loop")
def _():
    import anthropic

    c = anthropic.Anthropic(base_url=BASE, api_key="unused")
    m = c.messages.create(model=MODEL, max_tokens=16, messages=[{"role": "user", "content": "What is a list?"}])
    assert m.content[0].type == "text" and m.usage.output_tokens > 0
    with c.messages.stream(model=MODEL, max_tokens=16, messages=[{"role": "user", "content": "What is a list?"}]) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text == final.content[0].text
    tools = [{"name": "get_weather", "description": "The weather in a city.",
              "input_schema": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}}, "required": ["city"]}}]
    ask = {"role": "user", "content": "Weather in Paris?"}
    m = c.messages.create(model=MODEL, max_tokens=256, tools=tools, messages=[ask])
    use = next(b for b in m.content if b.type == "tool_use")
    assert m.stop_reason == "tool_use" and "city" in use.input
    done = c.messages.create(model=MODEL, max_tokens=32, tools=tools, messages=[
        ask, {"role": "assistant", "content": m.content},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": get_weather(use.input["city"])}]}])
    assert done.content[0].type == "text"
    return f"text, stream, get_weather({use.input}) then an answer"


width = max(len(r[0]) for r in results)
print(f"{'client':<{width}} | call | result")
for client, call, status, detail in results:
    print(f"{client:<{width}} | {call} | {status} {detail}")
failed = [r for r in results if r[2] != "ok"]
sys.exit(1 if failed else 0)
