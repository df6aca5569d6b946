"""Request and response bodies of every route, one module per resource, with the examples
shown in ``/docs``.

Bounds here are the loose, static ones (types, signs, sizes that keep numbers on the wire),
taken from :mod:`vajra.policies.request_rules` so the OpenAPI document and the gateway agree;
the gateway applies the cluster's configured limits (``gateway.max_tokens_limit``,
``gateway.max_prompt_chars``, …) and its refusals come back as 400 naming the field.
"""
