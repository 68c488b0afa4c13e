"""The real App in headless Chromium, for the ``browser`` tests.

One App server for these tests (``fo.launch_app(remote=True)`` on a free
local port, started after ``FIFTYONE_PLUGINS_DIR`` points at a plugins
dir that holds this repo, so the server process loads the plugin), one
Chromium (the Debian package, ``/usr/bin/chromium``; Playwright never
downloads a browser here), and a fresh page per test.

The tests read what the App did through the ``fo.Session`` object: the App
sends every view change and selection back to the session, so
``session.view`` and ``session.selected`` are the App's state, polled with
a timeout. Screenshots of each step go to ``test-artifacts/browser/``, and
a test that fails leaves ``<test>-FAILED.png`` and ``.html`` there too.

``PRELABEL_UPDATE_DOCS=1`` also copies the screenshots the README shows
into ``docs/`` (otherwise ``docs/`` is never written).
"""

import glob
import os
import re
import shutil
import socket
import time
import uuid

import fiftyone as fo
import numpy as np
import pytest

REPO = os.path.dirname(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
)
ARTIFACTS = os.path.join(REPO, "test-artifacts", "browser")
DOCS = os.path.join(REPO, "docs")
CHROMIUM = os.environ.get("PRELABEL_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
#: seconds to wait for anything the App does
TIMEOUT = 60
VIEWPORT = {"width": 1400, "height": 900}


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate, what, timeout=TIMEOUT, interval=0.2):
    """Polls ``predicate`` until it returns something truthy; returns it.

    Exceptions while polling count as "not yet" (the App's state arrives
    in pieces); after ``timeout`` the last one is chained to the failure.
    """
    deadline = time.monotonic() + timeout
    error = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except Exception as e:  # noqa: BLE001 - not there yet
            error = e
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout} s waiting for {what}"
            ) from error
        time.sleep(interval)


# ---- the plugin, the App server, the browser --------------------------


@pytest.fixture(scope="package")
def browser_plugins_dir(session_dir):
    """A plugins dir holding this repo as a plugin (a symlink), visible
    to this process and to the App server it starts."""
    path = os.path.join(session_dir, "plugins")
    os.makedirs(path, exist_ok=True)
    link = os.path.join(path, "prelabel-qdrant")
    if not os.path.islink(link):
        os.symlink(REPO, link)
    old_env = os.environ.get("FIFTYONE_PLUGINS_DIR")
    old = fo.config.plugins_dir
    os.environ["FIFTYONE_PLUGINS_DIR"] = path
    fo.config.plugins_dir = path
    yield path
    fo.config.plugins_dir = old
    if old_env is None:
        os.environ.pop("FIFTYONE_PLUGINS_DIR", None)
    else:
        os.environ["FIFTYONE_PLUGINS_DIR"] = old_env


@pytest.fixture(scope="package")
def chromium():
    """Headless Chromium from the Debian package, driven by Playwright."""
    if not os.path.exists(CHROMIUM):
        pytest.skip(
            f"{CHROMIUM} is missing: run `bash scripts/setup-browser.sh` "
            "(Debian packages chromium, chromium-driver)"
        )
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="pip install -e '.[dev]' (playwright)"
    )
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True
        )
        yield browser
        browser.close()


@pytest.fixture(scope="package")
def app_session(browser_plugins_dir, chromium):
    """One App server for the browser tests (stopped after the last of
    them); each test points it at its own dataset through
    :meth:`App.open`."""
    placeholder = fo.Dataset(f"prelabel-browser-{uuid.uuid4().hex[:8]}")
    session = fo.launch_app(
        placeholder,
        port=_free_port(),
        address="127.0.0.1",
        remote=True,
        auto=False,
    )
    wait_until(lambda: session._client._connected, "the session client")
    yield session
    session.close()
    placeholder.delete()


class App:
    """A page of the App and the session it belongs to, with the few
    gestures the tests make. Selectors are the App's own ``data-cy``
    attributes where it has them, else roles and visible texts."""

    def __init__(self, session, page, name):
        self.session = session
        self.page = page
        self.name = name

    @property
    def url(self):
        return f"http://127.0.0.1:{self.session.server_port}/"

    # ---- state ----------------------------------------------------------

    def set_state(self, dataset, view=None):
        """Points the session at ``dataset`` (and ``view``), default
        spaces, nothing selected."""

        def push():
            self.session.dataset = dataset
            self.session.spaces = None
            if view is not None:
                self.session.view = view
            return True

        wait_until(push, "the session to accept the dataset", timeout=30)

    def open(self, dataset, view=None):
        """Loads the App on ``dataset`` (and ``view``) and waits for the
        grid."""
        self.set_state(dataset, view)
        self.page.goto(self.url, wait_until="load")
        self.page.locator("[data-cy=looker]").first.wait_for(
            timeout=TIMEOUT * 1000
        )
        self.dismiss_popups()

    def dismiss_popups(self):
        """The App's one-time "Explore Enterprise" card covers the top
        right corner; close it when it shows."""
        dismiss = self.page.get_by_text("Dismiss", exact=True)
        try:
            dismiss.wait_for(timeout=3000)
            dismiss.click()
        except Exception:  # noqa: BLE001 - not shown this time
            pass

    def wait_view(self, predicate, what, timeout=TIMEOUT):
        """Waits until the App's view (as the session sees it) satisfies
        ``predicate(view)``; returns the view."""

        def check():
            view = self.session.view
            return view if view is not None and predicate(view) else None

        return wait_until(check, what, timeout=timeout)

    def grid_count(self):
        """The "<n> samples" count above the grid."""
        text = self.page.get_by_text(re.compile(r"^[\d,]+ samples?$"))
        return int(re.sub(r"\D", "", text.first.inner_text()))

    # ---- operators ----------------------------------------------------------

    def open_operator(self, label, name):
        """Opens the operator browser (the backtick key), searches
        ``label`` and opens the operator ``name``; returns its form."""
        page = self.page
        page.locator("body").click(position={"x": 5, "y": 5})
        page.keyboard.press("`")
        search = page.locator("[data-cy=operators-browser-search]")
        search.wait_for(timeout=TIMEOUT * 1000)
        search.fill(label)
        browser = page.locator("[data-cy=operators-browser]")
        browser.get_by_text(name, exact=True).click()
        modal = page.locator("[data-cy=operators-prompt-modal]")
        modal.wait_for(timeout=TIMEOUT * 1000)
        return modal

    def form_field(self, modal, label):
        """The input block of the field labelled ``label`` in ``modal``
        (an operator form, or any part of the page holding a panel)."""
        return modal.locator(
            f'div:has(> div p:text-is("{label}"))'
            ":has(input, [role=combobox])"
        ).last

    def choose(self, modal, label, option):
        """Picks ``option`` in the dropdown labelled ``label``."""
        self.form_field(modal, label).locator("[role=combobox]").click()
        self.page.get_by_role("option", name=option, exact=True).click()
        wait_until(
            lambda: self.form_field(modal, label)
            .locator("[role=combobox]")
            .inner_text()
            .strip()
            == option,
            f"{label!r} to show {option!r}",
        )

    def fill(self, modal, label, value):
        field = self.form_field(modal, label).locator("input").first
        field.fill(str(value))
        field.evaluate("element => element.blur()")

    def execute(self, modal):
        """Runs the form now. With no delegated-operation orchestrator
        registered (as here), the App offers "Execute" as the main
        action even for operators that default to delegation."""
        modal.get_by_role("button", name="Execute", exact=True).click()

    # ---- screenshots --------------------------------------------------------

    def shot(self, step, locator=None, clip=None, docs_name=None):
        """Saves a screenshot of the page (or of ``locator``, or of the
        ``clip`` rectangle) as a test artifact; with
        ``PRELABEL_UPDATE_DOCS=1``, also as ``docs/<docs_name>``."""
        os.makedirs(ARTIFACTS, exist_ok=True)
        path = os.path.join(ARTIFACTS, f"{self.name}-{step}.png")
        if locator is not None:
            locator.screenshot(path=path)
        else:
            self.page.screenshot(path=path, clip=clip)
        if docs_name and os.environ.get("PRELABEL_UPDATE_DOCS") == "1":
            os.makedirs(DOCS, exist_ok=True)
            shutil.copyfile(path, os.path.join(DOCS, docs_name))
        return path

    def save_failure(self):
        os.makedirs(ARTIFACTS, exist_ok=True)
        base = os.path.join(ARTIFACTS, f"{self.name}-FAILED")
        try:
            self.page.screenshot(path=base + ".png")
            with open(base + ".html", "w") as f:
                f.write(self.page.content())
        except Exception:  # noqa: BLE001 - the page may be gone
            pass


@pytest.fixture
def app(request, app_session, chromium):
    """A fresh page of the App; on failure it leaves a screenshot."""
    context = chromium.new_context(viewport=VIEWPORT)
    context.set_default_timeout(TIMEOUT * 1000)
    page = context.new_page()
    name = re.sub(r"\W+", "_", request.node.name).strip("_")
    for old in glob.glob(os.path.join(ARTIFACTS, f"{name}-*")):
        os.remove(old)
    driver = App(app_session, page, name)
    yield driver
    report = getattr(request.node, "rep_call", None)
    if report is None or report.failed:
        driver.save_failure()
    context.close()


# ---- data -------------------------------------------------------------


def digits_dataset(digit_images, n=300, train_frac=0.5, seed=0):
    """``n`` real digits (PNG files) with ``ground_truth`` and a
    ``train`` / ``test`` tag."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(digit_images))[:n]
    dataset = fo.Dataset(f"prelabel-browser-{uuid.uuid4().hex[:8]}")
    samples = []
    for rank, i in enumerate(order):
        path, label = digit_images[i]
        samples.append(
            fo.Sample(
                filepath=path,
                ground_truth=fo.Classification(label=label),
                tags=["train" if rank < int(n * train_frac) else "test"],
            )
        )
    dataset.add_samples(samples, progress=False)
    return dataset


@pytest.fixture
def make_dataset(digit_images):
    """``make_dataset(n=..., ...)``: datasets deleted after the test."""
    made = []

    def make(**kwargs):
        dataset = digits_dataset(digit_images, **kwargs)
        made.append(dataset)
        return dataset

    yield make
    for dataset in made:
        if fo.dataset_exists(dataset.name):
            dataset.delete()
