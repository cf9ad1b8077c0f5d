"""Serving a model: the continuous-batching engine (engine.py) over the model's KV cache, the OpenAI-compatible
HTTP app (app.py, protocol.py, metrics.py) on uvicorn (server.py), the chat template and the terminal chat
session (chat_template.py, chat.py). Starlette and uvicorn are imported only by app.py and server.py."""
