"""OpenAI-compatible `POST /v1/chat/completions` and `GET /v1/models`, in vLLM's wire format.

A chat request becomes one Kosmos-2 task on the conversation's one image, through the same batcher,
limits, key, image cache and metrics as every other route:

| the last user message's text              | task                 | prompt sent                                     |
| ----------------------------------------- | -------------------- | ----------------------------------------------- |
| none                                      | brief caption        | `<grounding> An image of`                       |
| has Kosmos-2 tags (`<grounding>`, ...)    | raw, as it is        | the text, unchanged                             |
| plain words (`What is red?`)              | grounded VQA         | `<grounding> Question: What is red? Answer:`    |

On a Kosmos-2.5 the model's own tasks run instead: no text, a request to read (`read this`, `OCR ...`,
`transcribe ...`) or `<ocr>` -> `ocr`; `<md>` -> `markdown`; other words -> `question`, which only
Kosmos-2.5-chat answers (on another model, an error naming the model's tasks). An `ocr` answer's content is
the lines' text, one a line, and `message.lines` lists them as `/v1/generate` does (text, corners, box, score);
a page's answer is streamed whole, with its result.

On Kosmos-2, the answer (`message.content`) is the paper's markdown: each grounded phrase a link to its pixel boxes;
`message.entities` lists the phrases with their boxes and each box's score. `min_score`, an extra body field
(the SDK's `extra_body`), drops the boxes scored under it from both.
It is the model's clean text as `POST /predict` gives it (a caption keeps its `An image of`), except
that a question's answer is given without the `Question: ... Answer:` frame. Errors on these routes
are OpenAI's `{"error": {"message", "type", "param", "code"}}`.

`protocol.py` is the wire format, `translate.py` the translation to a Kosmos-2 task and back, `routes.py`
the routes and the streaming.
"""

from kosmos_serve.server.openai.protocol import ERROR_FORMAT
from kosmos_serve.server.openai.routes import router

__all__ = ["ERROR_FORMAT", "router"]
