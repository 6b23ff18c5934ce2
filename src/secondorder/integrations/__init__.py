"""Adapters that put the library's methods into other frameworks' training code.

- :mod:`secondorder.integrations.torch`: ``Optimizer``, a ``torch.optim.Optimizer`` that runs any
  registered method on an ``nn.Module``.

Each integration is its own submodule and imports its framework only when it is imported itself;
importing this package imports no framework.
"""

__all__: list[str] = []
