"""Llama Stack inference providers: ``inline::posttrain`` and ``remote::posttrain``, for what posttrain's
post_training provider of the same stack trained.

``module: posttrain.llama_stack.inference`` in run.yaml makes Llama Stack call ``provider.get_provider_spec()``
here (a package of its own: Llama Stack picks a module's specs by provider type alone, and the post_training
providers have the same types). Each provider depends on the post_training provider and serves its jobs'
models: inline, through the ServiceCore that runs them (one inference worker under ``worker_python``);
remote, through the posttrain service's OpenAI routes. ``chat.py`` is Llama Stack's side, ``served.py``
(one level up) the names and the transport.
"""
