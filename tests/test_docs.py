"""The repository is self-contained: nothing it holds points outside it, and every citation of the
method document names a section that METHOD.md has."""
import os
import re
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
THIS_FILE = os.path.relpath(os.path.abspath(__file__), REPO)
SECTIONS = {1: "Model", 2: "Set similarity", 3: "Losses", 4: "Training", 5: "Evaluation", 6: "Data"}
# References to the team's notes outside the repository (this file spells them out and is skipped).
OUTSIDE_REFERENCES = re.compile(r"\.\./shared|SPEC\.md|\bSPEC\b")
# "METHOD.md §3", "METHOD.md §4 and §6", "METHOD.md §§2-3": every number after the file name.
CITATION = re.compile(r"METHOD\.md,?\s+(§+\s*\d+(?:\s*(?:,|and|or|-|–)\s*§*\s*\d+)*)")
SECTION_NUMBER = re.compile(r"\d+")
HEADING = re.compile(r"^## §(\d+) (.+?)\s*$", re.MULTILINE)
MARKDOWN_LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_no_tracked_file_points_outside_the_repository():
    offenders = [f"{path}:{number}: {line.strip()[:100]}"
                 for path, text in tracked_text_files() if path != THIS_FILE
                 for number, line in enumerate(text.splitlines(), 1) if OUTSIDE_REFERENCES.search(line)]
    assert not offenders, "references to files outside the repository:\n" + "\n".join(offenders)


def test_method_document_has_the_six_numbered_sections_in_order():
    headings = [(int(number), title) for number, title in HEADING.findall(read("METHOD.md"))]
    assert headings == sorted(SECTIONS.items())


def test_every_method_citation_names_an_existing_section():
    existing = {int(number) for number, _ in HEADING.findall(read("METHOD.md"))}
    cited = {}
    for path, text in tracked_text_files():
        for match in CITATION.finditer(text):
            for number in SECTION_NUMBER.findall(match.group(1)):
                cited.setdefault(int(number), []).append(path)
        if path == "METHOD.md":     # its own cross-references are a bare "§n"
            for number in re.findall(r"§(\d+)", text):
                cited.setdefault(int(number), []).append(path)
    assert cited, "nothing cites METHOD.md"
    missing = {number: sorted(set(paths)) for number, paths in cited.items() if number not in existing}
    assert not missing, f"citations of sections METHOD.md does not have: {missing}"


def test_relative_links_in_markdown_files_resolve_inside_the_repository():
    broken = []
    for path, text in tracked_text_files():
        if not path.endswith(".md"):
            continue
        for target in MARKDOWN_LINK.findall(text):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue            # web addresses and in-page anchors
            resolved = os.path.normpath(os.path.join(REPO, os.path.dirname(path), target.split("#")[0]))
            if not resolved.startswith(REPO + os.sep) or not os.path.exists(resolved):
                broken.append(f"{path}: {target}")
    assert not broken, "links that lead nowhere inside the repository:\n" + "\n".join(broken)


# ----------------------------------------------------------------------------- helpers

def read(relative_path):
    with open(os.path.join(REPO, relative_path), encoding="utf-8") as handle:
        return handle.read()


def tracked_text_files():
    """(path relative to the repository, text) of every tracked text file; without git (a copied
    tree), every file outside hidden, data and run folders."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True)
        paths = [p for p in listed.stdout.decode().split("\0") if p]
    except (OSError, subprocess.CalledProcessError):
        paths = []
    if not paths:
        skipped = {"data", "runs", "__pycache__"}
        for root, folders, files in os.walk(REPO):
            folders[:] = [f for f in folders if not f.startswith(".") and f not in skipped]
            paths += [os.path.relpath(os.path.join(root, name), REPO) for name in files]
    for path in sorted(paths):
        try:
            text = read(path)
        except (UnicodeDecodeError, FileNotFoundError, IsADirectoryError):
            continue        # binary files; files deleted but not yet committed
        yield path, text
