"""One exception hierarchy for the whole library.

Every error a user can trigger with bad input derives from :class:`CausalNetError`, so
``except causalnet.errors.CausalNetError`` catches all of them. Each message names the node,
layer, shape, record or file at fault.
"""

from __future__ import annotations


class CausalNetError(Exception):
    """Base class of every error raised by causalnet."""


class GraphError(CausalNetError):
    """The structure of a model is invalid (cycle, unknown or duplicate node, bad parent)."""


class CycleError(GraphError):
    """Adding a node would create a directed cycle."""


class UnknownNodeError(GraphError, KeyError):
    """A node name that the model does not have."""

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return str(self.args[0]) if self.args else ""


class DuplicateNodeError(GraphError):
    """A node name that is already taken."""


class InterventionError(CausalNetError):
    """An intervention that cannot be applied (unknown or exogenous node, bad value)."""


class ContextError(CausalNetError):
    """The exogenous context is incomplete or inconsistent (missing input, batch sizes differ)."""


class ShapeError(CausalNetError):
    """A tensor whose batch size or shape is not what the node or site requires."""


class NonFiniteError(CausalNetError):
    """A computed value contains NaN or inf."""


class MechanismError(CausalNetError):
    """A node's mechanism that cannot take its parents (wrong number of arguments, found when
    the node is added) or that raised while the model ran; names the node and chains the
    original exception (``__cause__``)."""


class ModelError(CausalNetError):
    """A model that cannot be adapted or loaded."""


class UnsupportedModelError(ModelError):
    """A model family the adapters do not cover; the message lists the supported families."""


class DataError(CausalNetError):
    """A data file or record that is malformed; the message names the file and the record."""


class ConfigError(CausalNetError, ValueError):
    """An argument or configuration field of the wrong type or out of range; names the field."""


class DeviceError(ConfigError):
    """A device that torch does not know, that cannot hold a model (``meta``), or that this
    machine does not have (``cuda`` without CUDA, a GPU index beyond the count)."""


class ResultsError(CausalNetError):
    """A results folder that cannot be written, read or resumed (e.g. different arguments)."""
