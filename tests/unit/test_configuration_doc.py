"""docs/configuration.md lists exactly the settings services/common/config.py has."""

from pathlib import Path

from services.common.config import settings_markdown

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def test_configuration_doc_has_the_current_settings_table():
    text = DOC.read_text()
    assert text.endswith(settings_markdown()), (
        "docs/configuration.md is stale: replace its table with "
        "`python -c 'from services.common.config import settings_markdown; print(settings_markdown(), end=\"\")'`"
    )
