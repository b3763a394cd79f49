"""ChouetteCopro ids: the relay accepts the contract's form only, the one form that stays a
single path segment of the API's URLs whatever it holds."""

from __future__ import annotations

from pathlib import Path

import yaml
from hypothesis import example, given
from hypothesis import strategies as st
from yarl import URL

from consumer.partner.answers import REMOTE_ID_PATTERN, is_remote_id

CONTRACT = Path(__file__).parents[2] / "schemas" / "chouettecopro.openapi.yaml"
DOCUMENTS = URL("https://chouette.example/api/v1/documents")


def test_the_pattern_is_the_contracts_id() -> None:
    contract = yaml.safe_load(CONTRACT.read_text(encoding="utf-8"))

    assert contract["components"]["schemas"]["Id"]["pattern"] == REMOTE_ID_PATTERN


@given(
    st.one_of(
        st.from_regex(REMOTE_ID_PATTERN, fullmatch=True),
        st.text(alphabet=st.sampled_from("aZ09_.-/?#%&=:;@+ \n\\é"), max_size=70),
    )
)
@example("../../../admin/x")
@example("..")
@example("%2e%2e")
@example("a..b")
def test_an_accepted_id_is_one_segment_of_the_documents_path(remote_id: str) -> None:
    if not is_remote_id(remote_id):
        return
    url = DOCUMENTS / remote_id  # the plain join, which resolves dot segments and splits on '/'

    assert (url.parent, url.name, url.query_string, url.fragment) == (DOCUMENTS, remote_id, "", "")
