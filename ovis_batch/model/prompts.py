"""Prompt ids for Ovis2.5: chat template rendering, `<image>` expansion, and the thinking-budget text.

The rendered prompt is `<|im_start|>user\\n<image>\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n`, followed
by an empty think block when thinking is off. The text around `<image>` is tokenised in separate chunks
(so the newlines on each side stay two `\\n` tokens, as upstream tokenises them), and each `<image>`
becomes `[image start] + [atom] * visual_tokens + [image end]` with the negative placeholder ids of
`ovis2_5.py`. A native-layout chat template renders the tokenizer's image token (`<|image_pad|>`) where
the official one renders `<image>`; either tag is found by rendering (`rendered_image_tag`).
"""

from __future__ import annotations

from dataclasses import dataclass

from ovis_batch.model.ovis2_5 import IMAGE_END_ID, IMAGE_START_ID, VISUAL_ATOM_ID

IMAGE_TAG = "<image>"
# Upstream's forced end of thinking when the budget runs out (tokenised on its own, counted as output).
EARLY_STOP_TEXT = (
    "\n\nConsidering the limited time by the user, I have to give the solution based on the thinking "
    "directly now.\n</think>\n\n"
)
# One-word summary prompts of the `last_token` embedding strategy (E5-V style), image and text alike.
IMAGE_SUMMARY_PROMPT = "Summarize the above image in one word:"
TEXT_SUMMARY_PROMPT = "{text}\nSummarize the above sentence in one word:"


@dataclass(frozen=True)
class SpecialTokens:
    pad: int
    im_start: int
    im_end: int
    think_start: int
    think_end: int

    @classmethod
    def from_tokenizer(cls, tokenizer) -> SpecialTokens:
        ids = {}
        for name, token in [
            ("pad", "<|endoftext|>"),
            ("im_start", "<|im_start|>"),
            ("im_end", "<|im_end|>"),
            ("think_start", "<think>"),
            ("think_end", "</think>"),
        ]:
            token_id = tokenizer.convert_tokens_to_ids(token)
            if token_id is None or token_id == tokenizer.unk_token_id:
                raise ValueError(
                    f"the tokenizer has no {token} token; is this a Qwen3-based Ovis2.5 checkpoint?"
                )
            ids[name] = token_id
        return cls(**ids)


def render_user_turn(
    tokenizer, chat_template: str, prompt: str, *, with_image: bool, **template_kwargs
) -> str:
    """One user turn (an optional image, then the prompt) and the generation prompt, rendered as text."""
    content: list[dict[str, str]] = [{"type": "image"}] if with_image else []
    content.append({"type": "text", "text": prompt})
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": content}],
        chat_template=chat_template,
        tokenize=False,
        add_generation_prompt=True,
        **template_kwargs,
    )


def rendered_image_tag(tokenizer, chat_template: str) -> str:
    """The text the chat template renders for an image: `<image>` (official layout), or the tokenizer's
    declared image token (transformers' native layout renders `<|image_pad|>`)."""
    text = render_user_turn(tokenizer, chat_template, "", with_image=True)
    for tag in (IMAGE_TAG, getattr(tokenizer, "image_token", None)):
        if tag and tag in text:
            return tag
    raise ValueError(
        f"the chat template renders an image as neither {IMAGE_TAG!r} nor the tokenizer's image token "
        f"(rendered: {text!r}); copy chat_template.json from the released model"
    )


class PromptBuilder:
    """Turns (prompt text, visual token counts) into the id sequence the model consumes."""

    def __init__(self, tokenizer, chat_template: str) -> None:
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.special = SpecialTokens.from_tokenizer(tokenizer)
        self.image_tag = rendered_image_tag(tokenizer, chat_template)
        self.early_stop_ids: list[int] = self.encode(EARLY_STOP_TEXT)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def render(self, prompt: str, with_image: bool, thinking: bool) -> str:
        return render_user_turn(
            self.tokenizer, self.chat_template, prompt, with_image=with_image, enable_thinking=thinking
        )

    def build(self, prompt: str, visual_tokens: int | None, thinking: bool) -> list[int]:
        """Prompt ids; `visual_tokens=None` means a text-only prompt."""
        text = self.render(prompt, with_image=visual_tokens is not None, thinking=thinking)
        chunks = text.split(self.image_tag)
        if visual_tokens is None:
            if len(chunks) != 1:
                raise ValueError(f"text-only prompt contains {self.image_tag!r}")
            return self.encode(text)
        if len(chunks) != 2:
            raise ValueError(
                f"the chat template rendered {len(chunks) - 1} {self.image_tag!r} tags for one image; "
                "prompts must not contain the image tag themselves"
            )
        image = [IMAGE_START_ID, *([VISUAL_ATOM_ID] * visual_tokens), IMAGE_END_ID]
        return self.encode(chunks[0]) + image + self.encode(chunks[1])
