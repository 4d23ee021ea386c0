"""Where the UI points for a release: a link a browser opens where one exists, else the location
as text (tasks/artifacts.py: release_link). No Prefect run: the S3 cases use the loopback endpoint."""

from __future__ import annotations

import os
import urllib.error
import urllib.request
import uuid

import boto3
import pytest

from tasks.artifacts import PRESIGN_ENV, PUBLIC_URL_ENV, release_link


@pytest.fixture
def s3_release(s3_endpoint):
    """A published release's model card on the S3 endpoint: (release URI, the card's bytes)."""
    bucket = f"links-{uuid.uuid4().hex[:8]}"
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=bucket)
    card = b"# fx Q8_0\n"
    s3.put_object(Bucket=bucket, Key="models/fx/0123456789abcdef/Q8_0/README.md", Body=card)
    return f"s3://{bucket}/models/fx/0123456789abcdef/Q8_0", card


def test_a_local_release_is_its_absolute_folder_as_text(tmp_path, monkeypatch):
    """Before: file://./artifacts/... (a relative file:// link, which no browser opens)."""
    monkeypatch.chdir(tmp_path)
    assert release_link("./artifacts/fx/0123/Q8_0") == (None, str(tmp_path / "artifacts" / "fx" / "0123" / "Q8_0"))
    assert release_link("file:///srv/releases/fx/0123/Q8_0") == (None, "/srv/releases/fx/0123/Q8_0")
    assert release_link("/srv/releases/fx/0123/Q8_0/") == (None, "/srv/releases/fx/0123/Q8_0")


def test_an_s3_release_is_its_uri_as_text_unless_a_link_is_configured(s3_release, monkeypatch):
    """Before: an s3:// link, which no browser opens."""
    uri, _ = s3_release
    monkeypatch.delenv(PUBLIC_URL_ENV, raising=False)
    monkeypatch.delenv(PRESIGN_ENV, raising=False)
    assert release_link(uri) == (None, uri)
    assert release_link(uri.replace("s3://", "s3://KEYID:secret@")) == (None, uri)  # credentials never shown


def test_an_s3_release_links_to_its_model_card_over_public_https_when_configured(s3_release, monkeypatch):
    uri, _ = s3_release
    bucket = uri.split("/")[2]
    monkeypatch.setenv(PUBLIC_URL_ENV, "https://{bucket}.s3.amazonaws.com/{key}")
    assert release_link(uri) == (f"https://{bucket}.s3.amazonaws.com/models/fx/0123456789abcdef/Q8_0/README.md", uri)


def test_an_s3_release_links_to_a_presigned_model_card_a_browser_opens(s3_release, monkeypatch):
    uri, card = s3_release
    monkeypatch.delenv(PUBLIC_URL_ENV, raising=False)
    monkeypatch.setenv(PRESIGN_ENV, "600")
    url, where = release_link(uri)
    assert where == uri and url.startswith(os.environ["AWS_ENDPOINT_URL"]) and "Signature=" in url
    with urllib.request.urlopen(url, timeout=30) as response:  # what a browser does with the link
        assert response.read() == card
    with pytest.raises(urllib.error.HTTPError):  # the signature is what opens it
        urllib.request.urlopen(url.split("?")[0], timeout=30)
