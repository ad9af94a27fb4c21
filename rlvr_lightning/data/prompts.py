"""Turn a question into the text the policy continues: its chat template, or a plain fallback."""

from __future__ import annotations

from typing import Any

# Tells the model where to put the answer the reward reads (see rewards.extract_answer).
DEFAULT_INSTRUCTION = "Put your final answer within \\boxed{}."


def build_prompt(
    tokenizer: Any,
    question: str,
    instruction: str = DEFAULT_INSTRUCTION,
    system_prompt: str | None = None,
) -> str:
    """The prompt string for one question, ending where the model's answer begins.

    With a chat template the user turn is ``question`` followed by ``instruction`` on a new line,
    after an optional system turn (None leaves the template's own default, if it has one), and
    the assistant header is appended. Without a template (a base model) the prompt is
    ``"Question: {question}\\n{instruction}\\nAnswer:"``, preceded by ``system_prompt`` if given.
    """
    instruction = instruction or ""
    if getattr(tokenizer, "chat_template", None):
        user_turn = f"{question}\n{instruction}" if instruction else question
        messages = [{"role": "user", "content": user_turn}]
        if system_prompt is not None:
            messages.insert(0, {"role": "system", "content": system_prompt})
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if not isinstance(prompt, str):
            raise TypeError(
                f"apply_chat_template(tokenize=False) returned {type(prompt).__name__}, not str"
            )
        return prompt
    lines = [f"Question: {question}"]
    if instruction:
        lines.append(instruction)
    lines.append("Answer:")
    prompt = "\n".join(lines)
    return f"{system_prompt}\n\n{prompt}" if system_prompt else prompt
