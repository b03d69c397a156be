"""A conversation with a bundle: each `ask` is the assistant's next turn, answered as a fresh run of
the whole conversation would answer it, reusing what the previous turn computed (Pipeline.stream_chat).

    with Pipeline.load("bundle") as pipeline:
        chat = Conversation(pipeline)
        print(chat.ask("What is in the picture?", image="photo.jpg").text)
        print(chat.ask("And what colour is it?").text)

LLaVA-1.5 takes one picture per conversation, in any turn: another needs `reset()` first.
"""

from __future__ import annotations

from typing import Iterator

from ..errors import MllmEdgeError
from .image import load_image
from .pipeline import Generation, Pipeline, RunResult
from .prompt import user_turn


class Conversation:
    def __init__(self, pipeline: Pipeline, system: str | None = None):
        self.pipeline, self.system = pipeline, system
        self.reset()

    def reset(self) -> None:
        """Forget the turns and the picture (the next ask starts a new conversation)."""
        self.messages: list[dict] = (
            [] if self.system is None else [{"role": "system", "content": self.system}]
        )
        self.image = None

    def ask(self, text: str, image=None, **options) -> RunResult:
        generation = self.stream(text, image, **options)
        for _ in generation:
            pass
        return generation.result

    def stream(self, text: str, image=None, **options) -> Generation:
        """The user's turn (with the conversation's picture, if this turn brings it) -> the answer as
        it is generated; the turn and the answer join the conversation once it is complete."""
        if image is not None and self.image is not None:
            raise MllmEdgeError("this conversation already has its picture: reset it to talk about another")
        if image is not None and not hasattr(image, "convert"):
            image = load_image(image)  # read once: later turns hand the same picture on
        turn = user_turn(text, image=image is not None)
        picture = image if image is not None else self.image
        generation = self.pipeline.stream_chat([*self.messages, turn], picture, **options)
        return Generation(self._keep(generation, turn, image))

    def _keep(self, generation: Generation, turn: dict, image) -> Iterator[str]:
        yield from generation
        self.messages += [turn, {"role": "assistant", "content": generation.result.text}]
        if image is not None:
            self.image = image
        return generation.result
