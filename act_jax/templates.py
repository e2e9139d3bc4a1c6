"""Prompt templates: one record -> (text, char offset where the response starts).

Three templates, shared by probe sets (statistics) and SFT data (training):
  'text'  one field of plain text; the whole text is the "response".
  'qa'    a question field and an answer field joined by `qa_format`, whose
          `{response}` placeholder marks where the response starts (the
          answer plus the format's tail, if any: the tokens a model
          should produce), e.g. 'Question: {prompt}\nAnswer: {response}'.
  'chat'  the tokenizer's chat template with user=prompt, assistant=response;
          the response starts where the user-only rendering (with the
          generation prompt) ends.
The response offset lets data.py mark response tokens exactly through the
tokenizer's offset mapping, so BPE merges across the boundary cannot shift it.
"""

from __future__ import annotations

from typing import Any

TEMPLATES = ('text', 'qa', 'chat')
DEFAULT_QA_FORMAT = 'Question: {prompt}\nAnswer: {response}'


class TemplateError(ValueError):
  """A record or template that cannot be rendered; names source and field."""


def required_fields(template: str, text_field: str, prompt_field: str,
                    response_field: str) -> tuple[str, ...]:
  """The record fields `template` reads."""
  if template == 'text':
    return (text_field,)
  if template in ('qa', 'chat'):
    return (prompt_field, response_field)
  raise TemplateError(f'unknown template {template!r}; known: '
                      f'{", ".join(TEMPLATES)}')


def check_qa_format(qa_format: str) -> None:
  """Raises TemplateError unless `qa_format` has {prompt} before {response}."""
  p, r = qa_format.find('{prompt}'), qa_format.find('{response}')
  if p < 0 or r < 0 or r < p:
    raise TemplateError(f'qa_format {qa_format!r} must contain {{prompt}} '
                        'followed by {response}')


def render(record: dict[str, Any], template: str, *, text_field: str = 'text',
           prompt_field: str = 'question', response_field: str = 'answer',
           qa_format: str = DEFAULT_QA_FORMAT,
           tokenizer: Any = None) -> tuple[str, int]:
  """Renders one record.

  Returns:
    (text, response_start): the full text and the character offset at which
    the response begins (0 for 'text': every token is response).
  """
  if template == 'text':
    return str(record[text_field]), 0
  prompt, response = str(record[prompt_field]), str(record[response_field])
  if template == 'qa':
    head, tail = qa_format.split('{response}', 1)
    head = head.replace('{prompt}', prompt)
    tail = tail.replace('{prompt}', prompt)
    return head + response + tail, len(head)
  if template == 'chat':
    if tokenizer is None or not getattr(tokenizer, 'chat_template', None):
      raise TemplateError("template 'chat' needs a tokenizer with a chat "
                          'template (tokenizer_config.json chat_template)')
    user = [{'role': 'user', 'content': prompt}]
    full = user + [{'role': 'assistant', 'content': response}]
    head = tokenizer.apply_chat_template(user, tokenize=False,
                                         add_generation_prompt=True)
    text = tokenizer.apply_chat_template(full, tokenize=False)
    if not text.startswith(head):
      raise TemplateError('chat template: the prompt-only rendering is not a '
                          'prefix of the full conversation; cannot locate '
                          'the response')
    return text, len(head)
  raise TemplateError(f'unknown template {template!r}; known: '
                      f'{", ".join(TEMPLATES)}')
