"""The Google Drive source against the real googleapiclient, answered by recorded-style Drive v3 responses."""

from __future__ import annotations

import json
import socket
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from googleapiclient.discovery import build
from googleapiclient.http import HttpMockSequence

from agentcomms import AgentMemoryInterface, ConfigError, KnowledgePermissions, Settings
from agentcomms.knowledge.gdrive import DriveConfig, build_drive_service, scan_drive
from agentcomms.knowledge.sources import SkippedFile, SourceDocument, UnchangedDocument

FIXTURES = Path(__file__).parent / "gdrive_fixtures"
MARKETING = "1MktFolderA1b2C3d4E5f6G7h8"
CAMPAIGNS = "1CampaignsFolderZ1x2C3v4B5"
SALES = "1SalesFolderNotSharedQ9w8"
BRAND, LAUNCH, SHEET = "1BrandGuideMdX9y8Z7w6V5u4", "1LaunchPlanDocQ1w2E3r4T5y6", "1BudgetSheetA9s8D7f6G5h4"
HUGE, LOCKED, FAQ = "1HugeReportPdfM1n2B3v4C5x6", "1LockedTxtP0o9I8u7Y6t5R4", "1FaqTxtL1k2J3h4G5f6D7s8"
SPRING = "1SpringCampaignMdA2s3D4f5"
ACCOUNT = "kb-reader@agentcomms-test.iam.gserviceaccount.com"

Response = tuple[dict[str, str], bytes]
Result = SourceDocument | SkippedFile | UnchangedDocument


def ok(name: str) -> Response:
    return {"status": "200"}, (FIXTURES / name).read_bytes()


def error(status: int, name: str) -> Response:
    return {"status": str(status), "content-type": "application/json; charset=UTF-8"}, (FIXTURES / name).read_bytes()


def drive(responses: Sequence[Response]) -> tuple[Any, HttpMockSequence]:
    """The real Drive v3 resource (discovery document from the package) over a mock that answers in order."""
    http = HttpMockSequence(list(responses))
    return build("drive", "v3", http=http, static_discovery=True), http


def requests(http: HttpMockSequence) -> list[tuple[str, dict[str, list[str]]]]:
    """What was asked, in order: (path, query parameters)."""
    out = []
    for uri, method, _, _ in http.request_sequence:
        assert method == "GET"
        parts = urlsplit(uri)
        out.append((parts.path.removeprefix("/drive/v3"), parse_qs(parts.query)))
    return out


def write_key(folder: Path, **changes: Any) -> Path:
    """A service account key file as the Cloud console makes them, with a fresh (local, unregistered) RSA key."""
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    key = {
        "type": "service_account",
        "project_id": "agentcomms-test",
        "private_key_id": "0123456789abcdef0123456789abcdef01234567",
        "private_key": pem.decode(),
        "client_email": ACCOUNT,
        "client_id": "100000000000000000001",
        "auth_uri": "https://accounts.google.com/o/oauth2/auth",
        "token_uri": "https://oauth2.googleapis.com/token",
    } | changes
    path = folder / "key.json"
    path.write_text(json.dumps(key))
    return path


def write_config(folder: Path, data: Any) -> Path:
    path = folder / "gdrive.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


@pytest.fixture
def config(tmp_path: Path) -> DriveConfig:
    write_key(tmp_path)
    folders = {MARKETING: "Marketing", SALES: "sales"}
    return DriveConfig.load(write_config(tmp_path, {"service_account_file": "key.json", "folders": folders}))


# The whole tree: the marketing folder (two pages, a sub-folder), then the sales folder, not shared.
# Only what must be fetched is here: a download of anything else finds the sequence empty and fails.
TREE = [
    ok("folder_marketing.json"),
    ok("list_marketing_page1.json"),
    ok("brand-guide.md"),
    ok("launch-plan.html"),
    ok("list_marketing_page2.json"),
    error(403, "error_403_download.json"),
    ok("list_campaigns.json"),
    ok("spring-campaign.md"),
    error(404, "error_404_folder.json"),
]
KNOWN = {
    f"gdrive:{FAQ}": f"2024-01-15T10:30:00.000Z@marketing@{MARKETING}",
    f"gdrive:{BRAND}": f"2024-04-01T00:00:00.000Z@marketing@{MARKETING}",
}


def scan(config: DriveConfig, known: Mapping[str, str] = KNOWN) -> tuple[list[Result], HttpMockSequence]:
    service, http = drive(TREE)
    results = list(scan_drive(service, config, known))
    assert len(http.request_sequence) == len(TREE), "every recorded response is used"
    return results, http


def by_location(results: list[Result]) -> dict[str, Result]:
    return {r.location.split("/d/")[-1].split("/")[0]: r for r in results}


def test_listing_follows_pages_and_sub_folders(config: DriveConfig) -> None:
    _, http = scan(config)
    asked = requests(http)
    assert [path for path, _ in asked] == [
        f"/files/{MARKETING}",
        "/files",
        f"/files/{BRAND}",
        f"/files/{LAUNCH}/export",
        "/files",
        f"/files/{LOCKED}",
        "/files",
        f"/files/{SPRING}",
        f"/files/{SALES}",
    ]
    listings = [query for path, query in asked if path == "/files"]
    assert [q["q"] for q in listings] == [
        [f"'{MARKETING}' in parents and trashed = false"],
        [f"'{MARKETING}' in parents and trashed = false"],
        [f"'{CAMPAIGNS}' in parents and trashed = false"],
    ]
    assert "pageToken" not in listings[0] and listings[1]["pageToken"] == ["~!!~AI9FV7Q2xPage2TokenFromDrive"]
    assert listings[0]["fields"] == ["nextPageToken, files(id, name, mimeType, modifiedTime, size, webViewLink)"]
    assert all(q["supportsAllDrives"] == ["true"] and q["includeItemsFromAllDrives"] == ["true"] for q in listings)


def test_markdown_file_is_downloaded_and_extracted_under_its_headings(config: DriveConfig) -> None:
    results, http = scan(config)
    guide = by_location(results)[BRAND]
    assert isinstance(guide, SourceDocument)
    assert guide.source_id == f"gdrive:{BRAND}" and guide.version == f"2024-05-02T09:14:03.512Z@marketing@{MARKETING}"
    assert guide.title == "brand-guide" and guide.domain == "marketing"
    assert guide.location == f"https://drive.google.com/file/d/{BRAND}/view?usp=drivesdk"
    voice = next(b for b in guide.blocks if "heron" in b.text)
    assert voice.heading == "Brand guide > Voice"
    assert requests(http)[2][1]["alt"] == ["media"]
    spring = by_location(results)[SPRING]
    assert isinstance(spring, SourceDocument) and spring.domain == "marketing"  # a sub-folder: its root's domain


def test_google_doc_is_exported_as_html(config: DriveConfig) -> None:
    results, http = scan(config)
    plan = by_location(results)[LAUNCH]
    assert isinstance(plan, SourceDocument)
    assert plan.title == "Launch plan" and plan.version == f"2024-05-03T16:40:27.081Z@marketing@{MARKETING}"
    assert [(b.heading, b.text) for b in plan.blocks] == [
        ("Launch plan", "The product launch happens on the 14th of June in Lisbon."),
        ("Launch plan > Press", "Embargoed press kits go out one week before the launch."),
    ]  # the export's <style> is not text
    assert requests(http)[3][1]["mimeType"] == ["text/html"]


def test_spreadsheet_is_skipped_with_a_reason(config: DriveConfig) -> None:
    results, _ = scan(config)
    sheet = by_location(results)[SHEET]
    assert isinstance(sheet, SkippedFile)
    assert sheet.reason == "unsupported Google type spreadsheet (application/vnd.google-apps.spreadsheet)"


def test_file_too_large_is_skipped_without_a_download(config: DriveConfig) -> None:
    results, http = scan(config)
    huge = by_location(results)[HUGE]
    assert isinstance(huge, SkippedFile) and huge.reason == "too large: 73400320 bytes, limit 20000000"
    assert not any(HUGE in path for path, _ in requests(http))


def test_unchanged_file_is_not_downloaded(config: DriveConfig) -> None:
    results, http = scan(config)
    faq = by_location(results)[FAQ]
    assert faq == UnchangedDocument(f"gdrive:{FAQ}", f"https://drive.google.com/file/d/{FAQ}/view?usp=drivesdk")
    assert not any(FAQ in path for path, _ in requests(http))
    assert isinstance(by_location(results)[BRAND], SourceDocument)  # known, but at an older modifiedTime


def test_a_file_whose_folder_moved_to_another_domain_is_read_again(config: DriveConfig) -> None:
    moved = {
        f"gdrive:{FAQ}": f"2024-01-15T10:30:00.000Z@support@{MARKETING}",
        f"gdrive:{BRAND}": KNOWN[f"gdrive:{BRAND}"],
    }
    service, http = drive([*TREE[:6], ok("brand-guide.md"), *TREE[6:]])  # after the 403: the FAQ is fetched again
    results = list(scan_drive(service, config, moved))
    faq = by_location(results)[FAQ]
    assert isinstance(faq, SourceDocument) and faq.domain == "marketing"


def test_http_error_on_one_file_skips_it_and_the_scan_goes_on(config: DriveConfig) -> None:
    results, _ = scan(config)
    locked = by_location(results)[LOCKED]
    assert isinstance(locked, SkippedFile)
    assert locked.reason == "cannot download: HTTP 403: The user does not have sufficient permissions for this file."
    assert locked.source_id == f"gdrive:{LOCKED}"  # not read this time: a stored copy of it is kept
    assert [r.location.split("/d/")[-1].split("/")[0] for r in results][-4:-1] == [LOCKED, FAQ, SPRING]


def test_folder_not_shared_is_reported_with_a_hint(config: DriveConfig) -> None:
    results, _ = scan(config)
    assert results[-1] == SkippedFile(
        f"https://drive.google.com/drive/folders/{SALES}",
        f"cannot list the folder: HTTP 404: File not found: {SALES}.; share the folder with {ACCOUNT}",
        incomplete=True,  # an ingest then removes nothing: the folder's files were not seen, not deleted
    )
    assert len(results) == 8 and sum(isinstance(r, SourceDocument) for r in results) == 3


def test_configured_sub_folder_keeps_its_own_domain(tmp_path: Path) -> None:
    unchanged = {
        f"gdrive:{BRAND}": f"2024-05-02T09:14:03.512Z@marketing@{MARKETING}",
        f"gdrive:{LAUNCH}": f"2024-05-03T16:40:27.081Z@marketing@{MARKETING}",
        f"gdrive:{LOCKED}": f"2024-05-01T07:55:12.000Z@marketing@{MARKETING}",
        f"gdrive:{FAQ}": f"2024-01-15T10:30:00.000Z@marketing@{MARKETING}",
    }
    service, http = drive([
        ok("folder_marketing.json"), ok("list_marketing_page1.json"), ok("list_marketing_page2.json"),
        ok("folder_marketing.json"), ok("list_campaigns.json"), ok("spring-campaign.md"),
    ])  # fmt: skip
    folders = {MARKETING: "marketing", CAMPAIGNS: "x"}
    config = DriveConfig(service_account_file=tmp_path / "absent.json", folders=folders)
    results = list(scan_drive(service, config, unchanged))
    spring = by_location(results)[SPRING]
    assert isinstance(spring, SourceDocument) and spring.domain == "x"
    assert sum(isinstance(r, UnchangedDocument) for r in results) == 4
    assert [path for path, _ in requests(http)][3:5] == [f"/files/{CAMPAIGNS}", "/files"]  # listed once, as a root


def test_docx_is_read_through_a_temporary_file(tmp_path: Path) -> None:
    import docx

    document = docx.Document()
    document.add_heading("Pricing", level=1)
    document.add_paragraph("The premium tier costs 40 euros a month.")
    document.save(str(tmp_path / "pricing.docx"))
    listing = {"files": [{"id": "1PricingDocx", "name": "Pricing.DOCX", "mimeType": "application/octet-stream",
                          "modifiedTime": "2024-06-01T00:00:00.000Z", "size": "9000"}]}  # fmt: skip
    service, http = drive([
        ({"status": "200"}, json.dumps({"id": "1Folder", "mimeType": "application/vnd.google-apps.folder"}).encode()),
        ({"status": "200"}, json.dumps(listing).encode()),
        ({"status": "200"}, (tmp_path / "pricing.docx").read_bytes()),
    ])  # fmt: skip
    config = DriveConfig(service_account_file=tmp_path / "absent.json", folders={"1Folder": "sales"})
    [found] = scan_drive(service, config, {})
    assert isinstance(found, SourceDocument)
    assert (found.location, found.title, found.domain) == ("gdrive:Pricing.DOCX", "Pricing", "sales")
    assert [(b.heading, b.text) for b in found.blocks] == [("Pricing", "The premium tier costs 40 euros a month.")]


def test_hint_without_a_readable_key_names_the_key_field(tmp_path: Path) -> None:
    service, _ = drive([error(404, "error_404_folder.json")])
    config = DriveConfig(service_account_file=tmp_path / "absent.json", folders={SALES: "sales"})
    [skipped] = scan_drive(service, config, {})
    assert isinstance(skipped, SkippedFile)
    assert skipped.reason.endswith("share the folder with the service account (client_email in its key file)")


# -- configuration ------------------------------------------------------------------------------


def test_config_resolves_the_key_next_to_it_and_normalises_domains(config: DriveConfig, tmp_path: Path) -> None:
    assert config.service_account_file == tmp_path / "key.json"
    assert config.folders == {MARKETING: "marketing", SALES: "sales"} and config.max_file_bytes == 20_000_000
    assert config.service_account_email() == ACCOUNT


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "cannot read the Google Drive config"),
        ("{not json", "is not JSON: Expecting property name enclosed in double quotes at line 1 column 2"),
        ({"service_account_file": "k.json", "folders": {"1Abc": "Sales Team!"}}, "'Sales Team!' is not a domain"),
        ({"service_account_file": "k.json", "folders": {}}, "folders: Dictionary should have at least 1 item"),
        ({"service_account_file": "k.json", "folders": {"1A'b": "sales"}}, "String should match pattern"),
        ({"folders": {"1Abc": "sales"}}, "service_account_file: Field required"),
        ({"service_account_file": "k.json", "folders": {"1Abc": "sales"}, "token": "SECRET-x"}, "Extra inputs"),
        ({"type": "service_account", "private_key": "SECRET-x"}, "looks like a service account key"),
    ],
)
def test_config_errors_are_config_errors_without_secrets(tmp_path: Path, content: Any, expected: str) -> None:
    path = tmp_path / "gdrive.json" if content is None else write_config(tmp_path, content)
    with pytest.raises(ConfigError) as caught:
        DriveConfig.load(path)
    assert expected in str(caught.value) and str(path) in str(caught.value)
    assert "SECRET" not in str(caught.value) and caught.value.__cause__ is None


# -- the service ----------------------------------------------------------------------------------


def test_build_drive_service_reads_the_key_and_asks_read_only(
    config: DriveConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise AssertionError("build_drive_service went to the network")

    monkeypatch.setattr(socket, "getaddrinfo", offline)
    monkeypatch.setattr(socket.socket, "connect", offline)
    service = build_drive_service(config)
    credentials = service._http.credentials
    assert credentials.service_account_email == ACCOUNT
    assert credentials.scopes == ["https://www.googleapis.com/auth/drive.readonly"]
    assert not credentials.token  # nothing asked of Google yet
    assert service.files().list(q="x").uri.startswith("https://www.googleapis.com/drive/v3/files?")


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"private_key": "-----BEGIN PRIVATE KEY-----\nSECRETabc\n-----END PRIVATE KEY-----\n"}, "cannot be used"),
        ({"private_key": "", "token_uri": ""}, "lacks private_key, token_uri"),
        ({"type": "authorized_user"}, "is not a service account key"),
    ],
)
def test_bad_key_files_are_config_errors_without_the_key(
    tmp_path: Path, changes: dict[str, str], expected: str
) -> None:
    key = write_key(tmp_path, **changes)
    config = DriveConfig(service_account_file=key, folders={MARKETING: "marketing"})
    with pytest.raises(ConfigError) as caught:
        build_drive_service(config)
    assert expected in str(caught.value) and "SECRET" not in str(caught.value) and "PRIVATE" not in str(caught.value)
    assert caught.value.__cause__ is None  # the key parser's error is not chained
    assert caught.value.__context__ is None or caught.value.__suppress_context__


def test_missing_key_file_is_a_config_error(tmp_path: Path) -> None:
    config = DriveConfig(service_account_file=tmp_path / "absent.json", folders={MARKETING: "marketing"})
    with pytest.raises(ConfigError, match="cannot read the service account key file .*absent.json"):
        build_drive_service(config)


# -- into the knowledge memory --------------------------------------------------------------------


async def test_drive_documents_are_searchable_and_a_second_scan_embeds_nothing(
    settings: Settings, tmp_path: Path
) -> None:
    listing = [ok("folder_marketing.json"), ok("list_campaigns.json")]
    config = DriveConfig(service_account_file=tmp_path / "absent.json", folders={MARKETING: "marketing"})
    kb = settings.model_copy(update={"knowledge_dir": tmp_path / "kb"})
    grants = KnowledgePermissions({"analyst": ["marketing"], "clerk": ["sales"]})
    async with AgentMemoryInterface(kb, mode="owner", permissions=grants) as memory:
        service, _ = drive([*listing, ok("spring-campaign.md")])
        first = await memory.ingest_documents(list(scan_drive(service, config, {})), scope="gdrive:")
        assert first.added == [f"https://drive.google.com/file/d/{SPRING}/view?usp=drivesdk"]
        assert first.chunks_embedded > 0 and not first.skipped
        found = await memory.search_knowledge("agent.x", "analyst", "when does the spring campaign run?")
        assert found and found[0].source.source_id == f"gdrive:{SPRING}"
        assert "garden centres" in found[0].text and found[0].source.title == "spring-campaign"
        assert await memory.search_knowledge("agent.x", "clerk", "when does the spring campaign run?") == []
        store = memory.store
        assert store is not None
        service, http = drive(listing)  # no download answer: the second scan must not download
        again = await memory.ingest_drive(config, drive_service=service)  # what it knows: from the store
        assert (again.chunks_embedded, again.unchanged, again.added, again.removed) == (0, 1, [], [])
        assert len(http.request_sequence) == 2


async def test_two_drive_configs_keep_each_others_documents(settings: Settings, tmp_path: Path) -> None:
    other_listing = json.dumps({"files": [{
        "id": "1OtherPlanMd", "name": "plan.md", "mimeType": "text/markdown",
        "modifiedTime": "2024-03-12T14:05:09.420Z", "size": "40",
    }]}).encode()  # fmt: skip
    first = DriveConfig(service_account_file=tmp_path / "absent.json", folders={MARKETING: "marketing"})
    second = DriveConfig(service_account_file=tmp_path / "absent.json", folders={"1SalesFolder": "sales"})
    kb = settings.model_copy(update={"knowledge_dir": tmp_path / "kb"})
    async with AgentMemoryInterface(kb, mode="owner") as memory:
        service, _ = drive([ok("folder_marketing.json"), ok("list_campaigns.json"), ok("spring-campaign.md")])
        assert len((await memory.ingest_drive(first, drive_service=service)).added) == 1
        service, _ = drive([ok("folder_marketing.json"), ({"status": "200"}, other_listing),
                            ({"status": "200"}, b"# Plan\n\nSell more carts.\n")])  # fmt: skip
        report = await memory.ingest_drive(second, drive_service=service)
        assert len(report.added) == 1 and report.removed == []  # the first config's file stays
        assert memory.store is not None and set(memory.store.documents()) == {f"gdrive:{SPRING}", "gdrive:1OtherPlanMd"}


def test_network_and_credential_failures_are_reasons_not_crashes(config: DriveConfig) -> None:
    from google.auth.exceptions import RefreshError

    class Broken:
        """A Drive API object whose every call fails as a dead network or a revoked key does."""

        def __init__(self, exc: Exception) -> None:
            self.exc = exc

        def files(self) -> Broken:
            return self

        def get(self, **_: Any) -> Broken:
            return self

        def execute(self, **_: Any) -> Any:
            raise self.exc

    failures: list[Exception] = [RefreshError("invalid_grant"), TimeoutError("timed out"), OSError("unreachable")]  # type: ignore[no-untyped-call]
    for exc in failures:
        results = list(scan_drive(Broken(exc), config, {}))
        skipped = [r for r in results if isinstance(r, SkippedFile) and r.incomplete]
        assert len(skipped) == len(results) == 2  # both configured folders, neither listed
        assert type(exc).__name__ in skipped[0].reason
