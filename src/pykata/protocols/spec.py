"""Service descriptions the ttrpc layer works from; defined in `pykata.ttrpc.service`, re-exported
here for the generated services' users."""

from pykata.ttrpc.errors import UnknownMethodError
from pykata.ttrpc.service import MethodSpec, ServiceSpec, spec_from_descriptor

__all__ = ["MethodSpec", "ServiceSpec", "UnknownMethodError", "spec_from_descriptor"]
