"""Plain text from a MediaWiki XML dump (``*.xml.bz2``): page streaming and markup stripping.

``strip_wiki_markup`` is a readable approximation of what MediaWiki renders, good enough for
an evaluation text: templates, tables, references, files and categories are dropped; links,
headings and emphasis keep their words. Nested constructs (templates in templates, links in
image captions) are found with a small balanced-delimiter scanner; the rest is regexes.
"""

from __future__ import annotations

import bz2
import dataclasses
import html
import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator


@dataclasses.dataclass(frozen=True)
class WikiPage:
  """One ``<page>`` of a dump: its latest revision's raw wikitext."""

  title: str
  namespace: int  # 0 for articles
  redirect: bool
  text: str


def _local(tag: str) -> str:
  """``{http://www.mediawiki.org/xml/export-0.10/}page`` -> ``page`` (any export version)."""
  return tag.rsplit("}", 1)[-1]


def _child_text(elem: ET.Element, name: str) -> str | None:
  for child in elem:
    if _local(child.tag) == name:
      return child.text or ""
  return None


def iter_wiki_pages(bz2_path: str | os.PathLike) -> Iterator[WikiPage]:
  """Streams every page of a bz2-compressed MediaWiki XML dump, in file order."""
  with bz2.open(bz2_path, "rb") as f:
    root = None
    for event, elem in ET.iterparse(f, events=("start", "end")):
      if event == "start":
        if root is None:
          root = elem
        continue
      if _local(elem.tag) != "page":
        continue
      revision = next((c for c in elem if _local(c.tag) == "revision"), None)
      text = _child_text(revision, "text") if revision is not None else None
      yield WikiPage(
        title=_child_text(elem, "title") or "",
        namespace=int(_child_text(elem, "ns") or 0),
        redirect=any(_local(c.tag) == "redirect" for c in elem),
        text=text or "",
      )
      root.clear()  # drop the finished pages so memory stays flat on big dumps


def is_article(page: WikiPage) -> bool:
  """Main-namespace content: not a redirect (by its ``<redirect>`` tag or ``#REDIRECT`` text)."""
  if page.namespace != 0 or page.redirect:
    return False
  return not page.text.lstrip().upper().startswith("#REDIRECT")


# --- balanced delimiters ---------------------------------------------------------------------


def _replace_balanced(text: str, open_: str, close: str, fn: Callable[[str], str]) -> str:
  """Replaces each outermost ``open_ ... close`` span (nesting counted) by ``fn(inner)``.

  An opener that is never closed is dropped (its text is kept), so no ``open_`` survives.
  """
  out = []
  i = 0
  while True:
    start = text.find(open_, i)
    if start < 0:
      out.append(text[i:])
      return "".join(out)
    out.append(text[i:start])
    depth, j = 1, start + len(open_)
    while depth and j < len(text):
      if text.startswith(open_, j):
        depth, j = depth + 1, j + len(open_)
      elif text.startswith(close, j):
        depth, j = depth - 1, j + len(close)
      else:
        j += 1
    if depth:  # unclosed: drop the opener only and carry on after it
      i = start + len(open_)
    else:
      out.append(fn(text[start + len(open_) : j - len(close)]))
      i = j


def _remove_tables(text: str) -> str:
  """Drops ``{| ... |}`` tables, nested ones included.

  Table delimiters only count at the start of a line (after indentation colons), as in
  MediaWiki; a cell such as ``[[Bracket|}]]`` must not end the table. An unclosed table runs to
  the end of the text.
  """
  out, depth = [], 0
  for line in text.split("\n"):
    stripped = line.lstrip(" \t:")
    if stripped.startswith("{|"):
      depth += 1
    elif depth and stripped.startswith("|}"):
      depth -= 1
    elif not depth:
      out.append(line)
  return "\n".join(out)


# Links into these namespaces are media or page metadata, not prose: dropped with their
# captions (which may hold links of their own; the balanced scanner skips those too).
_DROPPED_LINK = re.compile(r"^\s*(file|image|media|category)\s*:", re.IGNORECASE)
# Interlanguage links, e.g. [[de:Anarchismus]]: a lowercase prefix and no label.
_INTERLANGUAGE = re.compile(r"^[a-z][a-z-]{1,11}:[^|]*$")


def _link_text(inner: str) -> str:
  """``[[target|label]]`` -> label, ``[[target]]`` -> target, media/category -> nothing."""
  if _DROPPED_LINK.match(inner) or _INTERLANGUAGE.match(inner):
    return ""
  target, bar, label = inner.partition("|")
  label = _replace_balanced(label, "[[", "]]", _link_text)  # stray nested links
  if bar and label.strip():
    return label
  return target.lstrip(":")  # [[:Category:X]] is a visible link to the category page


# --- regexes (applied in the order of strip_wiki_markup) -------------------------------------

# <nowiki> and <pre> content is literal text: its markup characters are escaped as entities
# (restored by the final unescape) so that no later step treats them as markup.
_LITERAL = re.compile(r"<(nowiki|pre)\b[^>]*>(.*?)</\1\s*>", re.IGNORECASE | re.DOTALL)
_LITERAL_ESCAPES = str.maketrans({c: f"&#{ord(c)};" for c in "{}[]|<>'=*#:;_-"})
_COMMENT = re.compile(r"<!--.*?(-->|$)", re.DOTALL)
_REF_SELF_CLOSING = re.compile(r"<ref\b[^>]*?/\s*>", re.IGNORECASE)
_REF = re.compile(r"<ref\b[^>]*>.*?</ref\s*>", re.IGNORECASE | re.DOTALL)
# Tags whose content is not prose (formulas, image galleries, ...): dropped with the content.
_NON_PROSE = re.compile(
  r"<(math|chem|gallery|imagemap|timeline|score|hiero|graph)\b[^>]*>.*?</\1\s*>",
  re.IGNORECASE | re.DOTALL,
)
_TAG = re.compile(r"</?[a-zA-Z][^<>]*>")
# [http://example.org label] -> label ([http://example.org] alone -> nothing).
_EXTERNAL_LINK = re.compile(r"\[(?:https?:|ftp:)?//[^\s\]]*\s*([^\]]*)\]", re.IGNORECASE)
_EMPHASIS = re.compile(r"'{2,}")  # '' italic, ''' bold, ''''' both
_HEADING = re.compile(r"^[ \t]*(={1,6})[ \t]*(.*?)[ \t]*\1[ \t]*$", re.MULTILINE)
_LIST_MARKER = re.compile(r"^[ \t]*[*#:;]+[ \t]*", re.MULTILINE)
_RULE = re.compile(r"^-{4,}[ \t]*$", re.MULTILINE)
_BEHAVIOR_SWITCH = re.compile(r"__[A-Z]+__")  # __TOC__, __NOTOC__, ...
# "Alabama ({{IPAc-en|...}}) is": parentheses emptied by removed templates (not "f()" in code).
_EMPTY_PARENS = re.compile(r"[ \t]+\([ \t,;]*\)")
_SPACES = re.compile(r"[ \t]{2,}")
_SPACE_BEFORE_PUNCT = re.compile(r"[ \t]+([.,])(?=\s|$)")  # left behind by removed refs
_BLANK_LINES = re.compile(r"\n{3,}")


def strip_wiki_markup(text: str) -> str:
  """Readable plain text of a page's wikitext (see the module docstring for what is kept)."""
  text = _LITERAL.sub(lambda m: m.group(2).translate(_LITERAL_ESCAPES), text)
  text = _COMMENT.sub("", text)
  # References first: they hold templates and links of their own, and are not prose.
  text = _REF_SELF_CLOSING.sub("", text)
  text = _REF.sub("", text)
  text = _NON_PROSE.sub("", text)
  # Templates (infoboxes, citations, parser functions), nested ones included.
  text = _replace_balanced(text, "{{", "}}", lambda inner: "")
  # Tables (after templates, whose arguments may hold table-like lines).
  text = _remove_tables(text)
  text = _replace_balanced(text, "[[", "]]", _link_text)
  text = _EXTERNAL_LINK.sub(r"\1", text)
  text = _TAG.sub("", text)  # <br />, <small>, <sup>, <blockquote>, <references />, ...
  text = _EMPHASIS.sub("", text)
  text = _HEADING.sub(r"\2", text)
  text = _LIST_MARKER.sub("", text)
  text = _RULE.sub("", text)
  text = _BEHAVIOR_SWITCH.sub("", text)
  # Entities last, so an escaped "&lt;ref&gt;" written in the prose stays text.
  text = html.unescape(text).replace("\xa0", " ")
  text = _EMPTY_PARENS.sub("", text)
  text = _SPACES.sub(" ", text)
  text = _SPACE_BEFORE_PUNCT.sub(r"\1", text)
  text = "\n".join(line.strip() for line in text.split("\n"))
  return _BLANK_LINES.sub("\n\n", text).strip()


def wiki_articles_text(bz2_path: str | os.PathLike) -> str:
  """Plain text of a dump's articles: each page's title line, then its text; blank-line separated.

  Only namespace-0 pages that are not redirects are kept; pages left empty are skipped.
  """
  parts = []
  for page in iter_wiki_pages(bz2_path):
    if not is_article(page):
      continue
    body = strip_wiki_markup(page.text)
    if body:
      parts.append(f"{page.title}\n{body}")
  return "\n\n".join(parts) + "\n"
