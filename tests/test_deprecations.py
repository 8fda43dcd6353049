"""The deprecation guard of conftest.py: our calls of deprecated API fail, libraries' own only warn."""

import warnings

import pytest


def _module(name: str, source: str, **globals_):
    """Functions defined by ``source`` as if in module ``name`` (a stand-in third-party library)."""
    namespace = {"__name__": name, "warnings": warnings, **globals_}
    exec(compile(source, f"<{name}>", "exec"), namespace)
    return namespace


# A library deprecating a function with the default stacklevel (as optax.global_norm does):
# the warning is attributed to the library, not to the caller.
LIB = _module("fakelib._src.api", "def old():\n    warnings.warn('old() is deprecated', DeprecationWarning)\n")
OTHER = _module("otherlib.core", "def uses_old():\n    old()\n", old=LIB["old"])


def test_our_call_of_deprecated_library_api_fails():
    with pytest.raises(DeprecationWarning, match=r"old\(\) is deprecated \(deprecated API called at .*"
                                                 r"test_deprecations.py"):
        LIB["old"]()


def test_a_librarys_own_deprecated_call_only_warns():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        OTHER["uses_old"]()  # our frame is further out; otherlib made the call
    assert [str(w.message) for w in caught] == ["old() is deprecated"]


def test_warnings_attributed_to_our_modules_are_errors():
    with pytest.raises(FutureWarning):
        warnings.warn("our own future change", FutureWarning)  # setup.cfg's filterwarnings
