"""Llama Stack post_training providers: ``inline::posttrain`` and ``remote::posttrain``.

Llama Stack's core imports ``posttrain.llama_stack.provider.get_provider_spec()`` (``module:
posttrain.llama_stack`` in run.yaml). Both providers are thin adapters: ``mapping`` turns Llama Stack
requests and dataset rows into a JobSpec and posttrain job states back into Llama Stack's shapes; the
inline provider runs jobs through posttrain's own store, scheduler and launcher on the Llama Stack
machine, the remote one sends them to a posttrain job service with ``posttrain.client``.

Nothing here imports torch: this package runs in Llama Stack's own (Python 3.12) environment and starts
workers under ``worker_python``. ``mapping`` and ``config`` import no Llama Stack code either, so they
are tested in posttrain's own environment.
"""
