// Ollama's official JavaScript client, unchanged, against `phi4 serve`.
// Usage: node js_clients.mjs BASE_URL. Exits non-zero on a failure.
import { Ollama } from 'ollama'
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
console.log('js client: ok')
