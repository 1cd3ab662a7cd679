"""statemesh-node: turn a contributed machine into a StateMesh node its operator cannot enter."""

__version__ = "0.1.0"
