"""Adapters that put the library's methods into other frameworks' training code.

- :mod:`secondorder.integrations.torch`: ``Optimizer``, a ``torch.optim.Optimizer`` that runs any
  registered method on an ``nn.Module``.
- :mod:`secondorder.integrations.optax`: ``as_optax``, any optimiser as an
  ``optax.GradientTransformationExtraArgs`` (``step_info`` reads the last step's summary).

Each integration is its own submodule and imports its framework only when it is imported itself;
importing this package imports no framework.
"""

__all__: list[str] = []
