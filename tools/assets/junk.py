"""The low-quality text planted in the demo corpus, one generator per thing a filter should act on.

Written for cpmctl: the boilerplate strings, site names, spam words and English sentences are made up. Every
generator takes a `random.Random` and returns the document's paragraphs (or, for the in-place edits, the edited
paragraphs plus what was changed, for the manifest).
"""

from __future__ import annotations

import random

from tools.assets.templates import WORDS, _name

# ----------------------------------------------------------------------------------------------------------------
# Boilerplate: navigation, cookie notices, share bars, copyright lines
# ----------------------------------------------------------------------------------------------------------------

BOILERPLATE_HEAD = [
    "首页 > {channel} > 正文",
    "当前位置：首页 > {channel}",
    "首页 | 新闻 | 财经 | 体育 | 娱乐 | 科技 | 汽车 | 房产",
    "登录 | 注册 | 帮助中心",
]
BOILERPLATE_TAIL = [
    "点击查看更多",
    "点击查看更多精彩内容",
    "版权所有 © {y1}-{y2} {site} 保留所有权利",
    "版权所有，未经授权禁止转载。",
    "本网站使用cookie来改善您的浏览体验，继续访问即表示您同意我们使用cookie。",
    "我们使用Cookie来提供更好的服务。点击“接受”即表示您同意。接受 拒绝",
    "分享到：微信 微博 QQ空间",
    "责任编辑：{name}",
    "扫描二维码，关注我们的微信公众号",
    "联系我们 | 关于我们 | 隐私政策 | 网站地图",
    "（本文来源：{site}）",
]
PAGE_ONLY = [
    "相关阅读", "热门推荐", "返回首页 返回顶部", "页面加载中，请稍候……", "404 您访问的页面不存在，点击返回首页",
    "上一篇：{headline}", "下一篇：{headline}", "猜你喜欢", "网友评论（{n2}条）", "发表评论 请先登录",
]


def _boiler(rng: random.Random, template: str, headline: str = "") -> str:
    year = rng.randint(2005, 2020)
    values = {"channel": rng.choice(WORDS["channel"]), "site": rng.choice(WORDS["site"]), "name": _name(rng),
              "y1": year, "y2": year + rng.randint(3, 6), "n2": rng.randint(12, 98), "headline": headline}
    return template.format_map(values)


def add_boilerplate_lines(rng: random.Random, paragraphs: list[str]) -> tuple[list[str], list[str]]:
    """A good article wrapped in page furniture: two lines, a navigation line on top and/or footers below."""
    head = [_boiler(rng, rng.choice(BOILERPLATE_HEAD))] if rng.random() < 0.5 else []
    tail = [_boiler(rng, t) for t in rng.sample(BOILERPLATE_TAIL, 2 - len(head))]
    return head + paragraphs + tail, head + tail


def boilerplate_page(rng: random.Random, headlines: list[str]) -> list[str]:
    """A page with no article at all: only navigation, link lists and footers."""
    lines = [_boiler(rng, rng.choice(BOILERPLATE_HEAD))]
    lines += [_boiler(rng, t, rng.choice(headlines)) for t in rng.sample(PAGE_ONLY, rng.randint(4, 7))]
    lines += [_boiler(rng, t) for t in rng.sample(BOILERPLATE_TAIL, rng.randint(3, 5))]
    return lines


# ----------------------------------------------------------------------------------------------------------------
# Too short
# ----------------------------------------------------------------------------------------------------------------

SHORT = ["{name}：收到，谢谢！", "沙发！", "顶一下，{name}说得对。", "已阅。", "转发", "打卡第{n2}天", "好的，明天见。",
         "哈哈，太有意思了", "未完待续", "（图片）", "{n2}楼", "同问", "支持{name}！", "谢谢分享。", "这个不错",
         "求链接", "路过", "第{n2}条评论", "{name}已加入群聊", "今天天气真好"]


def too_short(rng: random.Random, i: int) -> list[str]:
    template = SHORT[i % len(SHORT)]
    return [template.format_map({"name": _name(rng), "n2": rng.randint(12, 98)})]


# ----------------------------------------------------------------------------------------------------------------
# Mostly non-Chinese: English paragraphs, markup and code left over from scraping
# ----------------------------------------------------------------------------------------------------------------

EN_SUBJECT = ["The city council", "A local bakery", "The new library", "Our weekend market", "The football club",
              "A small startup", "The science museum", "Volunteers from the park", "The night bus service",
              "A group of students"]
EN_VERB = ["announced a plan to", "decided to", "will soon", "has started to", "is trying to", "promised to"]
EN_OBJECT = ["extend its opening hours", "hire more staff", "repair the old bridge", "offer free classes for children",
             "plant two hundred trees", "host a music festival", "reduce plastic waste", "open a second shop",
             "collect old books for schools", "run a cooking contest"]
EN_TAIL = ["next month.", "before the end of the year.", "this summer.", "after many requests from residents.",
           "according to a short statement.", "if the weather allows it."]
CODE_LINES = ['<div class="nav-item" id="menu-{n}">', "</div>", 'var item{n} = document.getElementById("box{n}");',
              "function init{n}() {{ return load(\"/api/v2/list?page={n}\"); }}", "https://www.example-{n}.com/page?id={n}&ref=home",
              "{{\"code\": 0, \"msg\": \"ok\", \"data\": [{n}, {m}]}}", "SELECT * FROM items WHERE id = {n};", "// TODO: fix {n}"]


def english(rng: random.Random) -> list[str]:
    paragraphs = []
    for _ in range(rng.randint(3, 5)):
        sentences = [f"{rng.choice(EN_SUBJECT)} {rng.choice(EN_VERB)} {rng.choice(EN_OBJECT)} {rng.choice(EN_TAIL)}"
                     for _ in range(rng.randint(3, 5))]
        paragraphs.append(" ".join(sentences))
    # a stray Chinese word, as in a scraped bilingual page: still far below any Chinese-ratio threshold
    paragraphs[0] = rng.choice(["新闻 ", "阅读 ", "English | "]) + paragraphs[0]
    return paragraphs


def code(rng: random.Random) -> list[str]:
    return [rng.choice(CODE_LINES).format(n=rng.randint(1, 999), m=rng.randint(1, 999))
            for _ in range(rng.randint(8, 16))]


# ----------------------------------------------------------------------------------------------------------------
# Symbol and digit junk
# ----------------------------------------------------------------------------------------------------------------

SYMBOLS = "#*@%&$¥=+-_|/\\<>[]{}~^★☆◆■□●○△▲※→←"


def symbols(rng: random.Random) -> list[str]:
    lines = []
    for _ in range(rng.randint(4, 9)):
        parts = []
        for _ in range(rng.randint(6, 14)):
            if rng.random() < 0.5:
                parts.append("".join(rng.choice(SYMBOLS) for _ in range(rng.randint(2, 6))))
            else:
                parts.append(str(rng.randint(0, 10 ** rng.randint(2, 8))))
        lines.append(" ".join(parts))
    if rng.random() < 0.5:  # a scraped price table: one Chinese word and a wall of numbers
        lines[0] = rng.choice(["价格表", "代码", "编号", "数据"]) + "：" + lines[0]
    return lines


# ----------------------------------------------------------------------------------------------------------------
# Repetition (Gopher-style): duplicate lines, a repeated n-gram, a pasted paragraph
# ----------------------------------------------------------------------------------------------------------------

REPEATED_LINES = ["欢迎光临{shop}，全场商品{d}折优惠！", "好消息！好消息！{shop}本周末全场特价！", "点赞关注不迷路，每天更新{d}条",
                  "今日特价：{shop}新品上市，欢迎选购", "签到打卡第{d}天", "本帖内容已被删除", "请输入验证码后继续访问",
                  "加载中，请稍候"]
REPEATED_NGRAMS = ["太好了", "哈哈", "买它", "冲冲冲", "顶顶顶", "好吃", "真的", "赞"]


def repetition(rng: random.Random, kind: str, fresh_paragraph: str) -> list[str]:
    values = {"shop": rng.choice(["小王超市", "阳光家电", "老李水果店", "百味小吃", "新新服装"]), "d": rng.randint(3, 9)}
    if kind == "lines":
        line = rng.choice(REPEATED_LINES).format_map(values)
        return [line] * rng.randint(12, 30)
    if kind == "ngram":
        gram = rng.choice(REPEATED_NGRAMS)
        return [fresh_paragraph[:20] + gram * rng.randint(30, 60), gram * rng.randint(20, 40)]
    if kind == "paragraph":
        return [fresh_paragraph] * rng.randint(5, 8)
    raise ValueError(kind)


# ----------------------------------------------------------------------------------------------------------------
# Control characters and odd whitespace (the document is good: normalization, not removal)
# ----------------------------------------------------------------------------------------------------------------

# Invisible and control characters go inside paragraphs (a normalizer deletes them); odd whitespace goes at
# paragraph edges (a normalizer strips it). The manifest's clean_text is the document after exactly that.
# Vertical tab and form feed are line breaks to some tools, so they only go at edges, where deleting them and
# breaking the line there give the same result.
INVISIBLE = {"\u200b": "zero-width space", "\ufeff": "byte-order mark", "\x00": "NUL", "\x07": "BEL", "\x1b": "ESC"}
EDGE_WHITESPACE = {"\u3000\u3000": "ideographic-space indent", "\t": "tab", "\xa0": "no-break space",
                   "  ": "trailing spaces", "\x0b": "vertical tab", "\x0c": "form feed"}
SEPARATORS = {"\r\n": "CRLF line ends", "\n\n": "blank lines", "\n \n": "whitespace-only lines"}


def add_odd_characters(rng: random.Random, paragraphs: list[str]) -> tuple[str, list[str]]:
    """Damage a good document the way scraped text is damaged. Returns the text and the names of what was
    injected; deleting the control characters, stripping each line and dropping empty lines restores it."""
    injected = set()
    out = []
    for p in paragraphs:
        chars = list(p)
        for _ in range(rng.randint(1, 3)):
            odd = rng.choice(list(INVISIBLE))
            chars.insert(rng.randrange(1, len(chars)), odd)
            injected.add(INVISIBLE[odd])
        p = "".join(chars)
        if rng.random() < 0.5:
            edge = rng.choice(list(EDGE_WHITESPACE))
            p = edge + p if rng.random() < 0.7 else p + edge
            injected.add(EDGE_WHITESPACE[edge])
        out.append(p)
    separator = rng.choice(list(SEPARATORS))
    injected.add(SEPARATORS[separator])
    text = separator.join(out)
    if rng.random() < 0.5:
        text = "\ufeff" + text
        injected.add(INVISIBLE["\ufeff"])
    return text, sorted(injected)


# ----------------------------------------------------------------------------------------------------------------
# Blocked words: made-up spam words for a user-supplied block list
# ----------------------------------------------------------------------------------------------------------------

BLOCKED_WORDS = ["金蛙币", "秒富通", "喵喵贷", "躺赚星球", "飞天返利宝", "暴涨彩票王", "九九代刷", "点金神器",
                 "无限红包群", "速成学历宝"]
SPAM = ["想要轻松赚钱，请立即下载{w}，每天躺着就能赚五百元！", "加入{w}，新用户注册就送八十八元红包。",
        "朋友推荐的{w}真的太好用了，私信我领取邀请码。", "还在辛苦上班？试试{w}，一个月收入翻三倍。"]


def add_spam(rng: random.Random, paragraphs: list[str]) -> tuple[list[str], str]:
    """Insert one spam sentence carrying a blocked word into a good document."""
    word = rng.choice(BLOCKED_WORDS)
    spam = rng.choice(SPAM).format(w=word)
    at = rng.randint(1, len(paragraphs) - 1)
    if rng.random() < 0.5:
        out = paragraphs[:at] + [spam] + paragraphs[at:]  # its own paragraph
    else:
        out = list(paragraphs)
        out[at] = out[at] + spam  # hidden inside a paragraph
    return out, word
