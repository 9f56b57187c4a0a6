from __future__ import annotations

import pytest

from catalog.db import make_engine, session_factory, upgrade_to_head
from catalog.locking import Taxonomy
from catalog.models import Category, CategorySynonym, Product, ProductCategory
from catalog.taxonomy import head_noun, place_type


@pytest.mark.parametrize(
    "product_type, head",
    [
        ("Rug, flatwoven", "rug"),
        ("Rug, high pile", "rug"),
        ("Three-seat sofa", "sofa"),
        ("Pendant lamp", "lamp"),
        ("Pendant lamp shade", "lamp shade"),
        ("Quilt cover and 4 pillowcases", "quilt cover"),
        ("Chest of 3 drawers", "chest"),
        ("Curtains, 1 pair", "curtain"),
        ("Armchair with cushion", "armchair"),
        ("Fridge A+", "fridge"),
        ("Shelving unit in,outdoor", "shelving unit"),
        ("Frame", "frame"),
        ("Bunk bed frame", "bed frame"),
    ],
)
def test_head_noun(product_type, head):
    assert head_noun(product_type) == head


def test_head_noun_rejects_empty():
    with pytest.raises(ValueError):
        head_noun(" , ")


def test_place_type_keys_and_synonyms():
    p = place_type("Rug, flatwoven")
    assert (p.class_key, p.type_key) == ("rug", "rug/rug-flatwoven")
    assert p.class_synonyms == ("rugs",)
    assert "rug flatwoven" in p.type_synonyms
    assert "pendant lamps" in place_type("Pendant lamp").type_synonyms


@pytest.fixture
def taxonomy(tmp_path) -> Taxonomy:
    engine = make_engine(f"sqlite:///{tmp_path / 'c.db'}")
    upgrade_to_head(engine)
    sessions = session_factory(engine)
    types = {
        "Chair": 3, "Chair, outdoor": 2, "Desk chair": 1, "Rug, flatwoven": 2, "Rug": 1, "Pendant lamp": 2,
        "Lamp shade": 1, "Pendant lamp shade": 1, "Holder for containers": 1, "Coffee,tea maker": 1, "Bed frame": 1,
        "Sofa": 1,
    }
    with sessions() as s:
        n = 0
        for t, count in types.items():
            p = place_type(t)
            cls = s.query(Category).filter_by(key=p.class_key).one_or_none()
            if cls is None:
                cls = Category(key=p.class_key, name=p.class_name, level="class")
                cls.synonyms = [CategorySynonym(phrase=x) for x in p.class_synonyms]
                s.add(cls)
                s.flush()
            leaf = Category(key=p.type_key, name=p.type_name, level="type", parent=cls)
            leaf.synonyms = [CategorySynonym(phrase=x) for x in p.type_synonyms]
            s.add(leaf)
            s.flush()
            for _ in range(count):
                n += 1
                s.add(Product(id=f"p{n}", type=t, content_hash="x"))
                s.flush()
                s.add(ProductCategory(product_id=f"p{n}", category_id=leaf.id))
        s.add(Category(key="empty", name="empty", level="class"))
        s.commit()
        return Taxonomy.load(s)


@pytest.mark.parametrize(
    "text, key",
    [
        ("a chair for this yard", "chair"),  # indefinite article: the class
        ("chairs for the garden", "chair"),  # plural: the class
        ("chair for this kitchen", "chair/chair"),  # bare catalog type name: the type
        ("white sofa", "sofa/sofa"),
        ("rug, flatwoven for this bedroom", "rug/rug-flatwoven"),
        ("a lamp shade for this bedroom", "lamp-shade"),
        ("pendant lamp shade for this kitchen", "lamp-shade/pendant-lamp-shade"),
        ("a lamp for this bedroom", "lamp"),
        ("holder for containers for this kitchen", "holder/holder-for-containers"),
        ("white and pine bed frame", "bed-frame/bed-frame"),
        ("a bed frame in white", "bed-frame"),
    ],
)
def test_lock_from_text(taxonomy, text, key):
    lock = taxonomy.resolve(text)
    assert lock.applied and lock.source == "text" and lock.key == key, lock
    assert lock.reason


def test_mentions_after_a_preposition_do_not_lock(taxonomy):
    lock = taxonomy.resolve("a cosy space for coffee and conversation")
    assert not lock.applied and "no category" in lock.reason
    assert taxonomy.resolve("a sofa for this room with a rug").key == "sofa"
    assert not taxonomy.resolve("a chair cushion for the yard").applied  # "chair" only modifies "cushion"
    assert taxonomy.resolve("a chair with armrests").key == "chair"
    assert "catalog name of the type" in taxonomy.resolve("chair for this kitchen").reason


def test_whole_room_queries_can_turn_the_text_lock_off(taxonomy):
    lock = taxonomy.resolve("a chair with armrests", from_text=False)
    assert not lock.applied and "off" in lock.reason
    assert taxonomy.resolve("a chair with armrests", "rugs", from_text=False).key == "rug"  # a request still locks


def test_explicit_category(taxonomy):
    assert taxonomy.resolve("anything", "rugs").key == "rug"
    assert taxonomy.resolve(None, "chair/chair-outdoor").key == "chair/chair-outdoor"
    unknown = taxonomy.resolve("a chair", "spaceship")
    assert not unknown.applied and "unknown" in unknown.reason
    empty = taxonomy.resolve("a chair", "empty")
    assert not empty.applied  # a category with no products never empties the result


def test_counts_roll_up_to_classes(taxonomy):
    assert taxonomy.categories["chair"].products == 6
    assert taxonomy.categories["chair/chair-outdoor"].products == 2
