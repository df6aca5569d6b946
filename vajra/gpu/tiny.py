"""A tiny random-weight Llama with a real, locally trained tokenizer, for tests and benchmarks.

:func:`init_tiny_model` writes a standard Hugging Face model directory (safetensors weights,
``config.json``, ``generation_config.json`` and a ``PreTrainedTokenizerFast``) that
``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained`` load offline.
Nothing is downloaded: the byte-level BPE tokenizer is trained in-process on the prose below,
so every string tokenizes and decodes back to itself.

The weights are random, so the text the model writes is nonsense; ``initializer_range`` is
raised well above Llama's 0.02 so that logits are peaky and greedy decoding rarely meets a
near-tie, which keeps batched and one-at-a-time decoding token-for-token equal.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
SPECIAL_TOKENS = (PAD, BOS, EOS)  # ids 0, 1, 2, in this order
VOCAB_SIZE = 1024

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

CORPUS = """\
The river town woke slowly on the first cold morning of autumn. Fishermen pushed their boats
into the grey water while the baker pulled the first loaves from an oven that had been burning
since four o'clock. Children ran along the stone wall by the harbour, counting the gulls and
arguing about whether there were twelve or thirteen of them. Nobody in the town was in a hurry,
and nobody had ever been, as far as the oldest woman at the market could remember.

A small train arrived at 7:45 with three passengers and a crate of apples. The station master
wrote the numbers in his book: 3 people, 1 crate, 42 apples, 0 delays. He liked numbers because
they never changed their minds. His daughter, who studied mathematics in the city, sent him
letters full of questions: what is 17 times 23? Why is the sum of 1, 2, 3 and 4 equal to 10?
He answered every letter, sometimes correctly, and always with a drawing of the harbour.

In the afternoon the wind turned to the north and the sky filled with long, thin clouds. The
teacher opened the windows of the school and told her pupils to listen. "What do you hear?" she
asked. One said the sea; another said the bells of the church; a third, who was always hungry,
said he could hear the soup cooking in the kitchen next door. Everyone laughed, and then they
went back to their lessons on rivers, mountains, the planets and the stars.

Servers answer requests; models predict the next word; a tokenizer splits text into pieces.
When many people ask questions at once, a good system groups them together, shares the work,
and sends each answer back as soon as it is ready. It measures time in milliseconds, counts
tokens carefully, and never loses a request, even when the network is slow or a machine fails.
Queues should be bounded, errors should be typed, and every deadline should be respected.

The evening was quiet. Lamps were lit one by one along the water, and the smell of wood smoke
drifted over the roofs. The fishermen came home with baskets of silver fish, 250 of them in all,
and sold them before the sun went down. Later, under a clear sky, the station master climbed the
hill behind his house with a small telescope and looked for Jupiter and its four bright moons.
He found them, wrote the time in his book (21:07), and went to sleep content.

Questions, answers, stories and lists: {"name": "river", "length_km": 118, "open": true}.
Punctuation matters too - commas, full stops, colons: semicolons; brackets [like these] and
(these), quotes 'single' and "double", the ampersand &, the hash #, percent 5%, and the dollar $9.99.
0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 64 128 256 512 1024 2048 3.14159 2.71828
"""


def _train_tokenizer() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS.splitlines(keepends=True), trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return tokenizer


def init_tiny_model(path: Path, *, seed: int = 0) -> Path:
    """Write a tiny random Llama and its tokenizer to ``path`` (created if missing); return it.

    The same ``seed`` gives byte-identical weights and tokenizer. The tokenizer adds ``<s>``
    (BOS) in front of every encoded text, as Llama's does.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)

    tokenizer = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=_train_tokenizer(),
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=2048,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(path)

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        initializer_range=0.15,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    finally:
        torch.random.set_rng_state(generator_state)
    model.generation_config = GenerationConfig(  # type: ignore[no-untyped-call]
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    model.save_pretrained(path, safe_serialization=True)
    return path
