"""mkdocs hooks: pages taken from README.md, so the tour and two guides are written once.

``tour.md`` is README.md's "A tour" section; ``guides/distributed.md`` and ``guides/private.md``
end with README.md's "Distributed training" and "Private training" sections, read when the site
is built. README links into ``docs/`` are rewritten to work from the site.
"""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
#: page -> (README section heading, where it goes in the page's own text)
SECTIONS = {
    "tour.md": "## A tour",
    "guides/distributed.md": "## Distributed training",
    "guides/private.md": "## Private training",
}
MARKER = "<!-- README section -->"


def readme_section(heading: str) -> str:
    """The README section under ``heading`` (a level-2 heading), up to the next level-2 heading,
    with its headings raised one level and its links into docs/ made relative to the site."""
    text = README.read_text()
    start = text.index(heading + "\n")
    following = re.search(r"^## ", text[start + len(heading):], re.M)
    section = text[start + len(heading): start + len(heading) + following.start()] if following else text[start + len(heading):]
    section = re.sub(r"\]\(docs/([^)]+)\)", r"](\1)", section)
    return section.strip() + "\n"


def on_page_markdown(markdown: str, page, config, files) -> str:
    """Put the README section where the page has its marker."""
    heading = SECTIONS.get(page.file.src_uri)
    if heading is None or MARKER not in markdown:
        return markdown
    section = readme_section(heading)
    if page.file.src_uri == "tour.md":
        # The README links the reliability page as docs/reliability.md: from the site's root.
        section = section.replace("](reliability.md)", "](reliability.md)")
    else:
        # From guides/, the other pages are one level up.
        section = re.sub(r"\]\((?!https?:|#|\.\./)([^)]+\.md[^)]*)\)", r"](../\1)", section)
    return markdown.replace(MARKER, section)
