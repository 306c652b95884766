import pytest

from prefect_tensorflow.tasks.errors import ImportStringError, PrefectTensorFlowError
from prefect_tensorflow.tasks.importing import load_object


def test_resolves_dotted_attribute():
    from prefect_tensorflow.tasks import iris

    assert load_object("prefect_tensorflow.tasks.iris:build_model", parameter="model") is iris.build_model
    assert load_object("os:path.join") is __import__("os").path.join


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("no_colon_here", "expected 'package.module:attribute'"),
        ("a:b:c", "expected 'package.module:attribute'"),
        ("", "expected 'package.module:attribute'"),
        (None, "expected 'package.module:attribute'"),
        ("no_such_module_xyz:build", "module 'no_such_module_xyz' cannot be imported"),
        ("prefect_tensorflow.tasks.iris:nope", "has no attribute 'nope'"),
        ("prefect_tensorflow.tasks.iris:FEATURE_NAMES", "expected a callable, got tuple"),
    ],
)
def test_bad_import_strings_name_the_parameter(spec, fragment):
    with pytest.raises(ImportStringError) as info:
        load_object(spec, parameter="model")
    message = str(info.value)
    assert message.startswith("model ")
    assert fragment in message
    assert isinstance(info.value, PrefectTensorFlowError)
