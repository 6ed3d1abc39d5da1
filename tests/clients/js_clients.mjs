// Ollama's and OpenAI's official JavaScript clients, unchanged, against `phi4 serve`.
// Usage: node js_clients.mjs BASE_URL. Exits non-zero on a failure.
import { Ollama } from 'ollama'
import OpenAI from 'openai'
import assert from 'node:assert/strict'

const client = new Ollama({ host: process.argv[2] })
const messages = [{ role: 'user', content: 'How do I open a file in Python?' }]
const options = { num_predict: 16, temperature: 0 }

let streamed = ''
let last
for await (const part of await client.chat({ model: 'phi4', messages, stream: true, options })) {
  streamed += part.message.content
  last = part
}
assert.ok(last.done && ['stop', 'length'].includes(last.done_reason), JSON.stringify(last))
const whole = await client.chat({ model: 'phi4', messages, options })
assert.equal(whole.message.content, streamed)

const second = await client.chat({ model: 'phi4', messages: [...messages, whole.message, { role: 'user', content: 'And close it?' }], options })
assert.ok(second.prompt_eval_count <= 24, `second turn evaluated ${second.prompt_eval_count}`)
console.log(`ollama-js chat: first turn ${last.prompt_eval_count} prompt tokens, second turn ${second.prompt_eval_count}`)

let generated = ''
for await (const part of await client.generate({ model: 'phi4', prompt: 'What is a list?', stream: true, options })) generated += part.response
const gen = await client.generate({ model: 'phi4', prompt: 'What is a list?', options })
assert.equal(gen.response, generated)

assert.deepEqual((await client.list()).models.map((m) => m.model), ['phi4:latest'])
const shown = await client.show({ model: 'phi4' })
assert.equal(shown.model_info['general.architecture'], 'phi3')
assert.ok((await client.version()).version)

await assert.rejects(client.chat({ model: 'llama3', messages }), (e) => e.status_code === 404 && /not found/.test(e.error))
const { embeddings } = await client.embed({ model: 'phi4', input: ['What is a tuple?', 'How do I open a file?'] })
assert.equal(embeddings.length, 2)
assert.ok(Math.abs(embeddings[0].reduce((s, x) => s + x * x, 0) - 1) < 1e-3)

// Tools and logprobs through ollama-js (tool_choice is phi4's addition to Ollama's API: the demo
// model never chooses a call on its own).
const weather = { type: 'function', function: { name: 'get_weather', description: 'The weather in a city.',
  parameters: { type: 'object', properties: { city: { type: 'string', maxLength: 30 } }, required: ['city'] } } }
const ask = [{ role: 'user', content: 'Weather in Paris?' }]
const called = await client.chat({ model: 'phi4', messages: ask, tools: [weather], tool_choice: 'required', options: { num_predict: 200, temperature: 0 } })
const call = called.message.tool_calls[0]
assert.equal(call.function.name, 'get_weather')
assert.ok(typeof call.function.arguments.city === 'string' && call.function.arguments.city.length <= 30, JSON.stringify(call))
const answered = await client.chat({ model: 'phi4', messages: [...ask, called.message, { role: 'tool', tool_name: 'get_weather', content: '21 degrees' }], tools: [weather], options: { num_predict: 8, temperature: 0 } })
assert.ok(!answered.message.tool_calls && answered.prompt_eval_count < 40, JSON.stringify(answered))
const scored = await client.chat({ model: 'phi4', messages, logprobs: true, top_logprobs: 2, options: { num_predict: 4, temperature: 0 } })
assert.equal(scored.logprobs.length, 4)
assert.equal(scored.logprobs[0].top_logprobs[0].token, scored.logprobs[0].token)
console.log('ollama-js: ok')

// openai-node: chat (streamed), tools, logprobs, the Responses API, embeddings.
const openai = new OpenAI({ baseURL: `${process.argv[2]}/v1`, apiKey: 'unused' })
let text = ''
for await (const chunk of await openai.chat.completions.create({ model: 'phi4', messages, max_tokens: 8, temperature: 0, stream: true })) {
  text += chunk.choices[0]?.delta?.content ?? ''
}
const chat = await openai.chat.completions.create({ model: 'phi4', messages, max_tokens: 8, temperature: 0, logprobs: true, top_logprobs: 1 })
assert.equal(chat.choices[0].message.content, text)
assert.equal(chat.choices[0].logprobs.content.length, 8)
const tc = await openai.chat.completions.create({ model: 'phi4', messages: ask, tools: [weather], tool_choice: 'required', max_tokens: 200, temperature: 0 })
assert.equal(tc.choices[0].finish_reason, 'tool_calls')
const args = JSON.parse(tc.choices[0].message.tool_calls[0].function.arguments)
assert.ok(typeof args.city === 'string')
const after = await openai.chat.completions.create({ model: 'phi4', max_tokens: 8, temperature: 0, tools: [weather],
  messages: [...ask, tc.choices[0].message, { role: 'tool', tool_call_id: tc.choices[0].message.tool_calls[0].id, content: '21 degrees' }] })
assert.equal(after.choices[0].finish_reason, 'length')
const resp = await openai.responses.create({ model: 'phi4', input: 'What is a list?', max_output_tokens: 8, temperature: 0 })
assert.ok(resp.output_text.length > 0 && resp.status === 'incomplete', JSON.stringify(resp))
let deltas = ''
for await (const e of await openai.responses.create({ model: 'phi4', input: 'What is a list?', max_output_tokens: 8, temperature: 0, stream: true })) {
  if (e.type === 'response.output_text.delta') deltas += e.delta
}
assert.equal(deltas, resp.output_text)
const emb = await openai.embeddings.create({ model: 'phi4', input: 'What is a list?' })
assert.ok(emb.data[0].embedding.length > 0)
console.log('openai-node: ok')

