-- Argo CD health for ferry.dev/ArtifactCache (Lua 5.1, as Argo CD runs it).
-- Healthy: Ready and not Degraded. Degraded: invalid spec or install failures.
-- Progressing: not yet observed, or no warm source has packed the cache yet.
local hs = {}
local function condition(obj, t)
  if obj.status == nil or obj.status.conditions == nil then return nil end
  for _, c in ipairs(obj.status.conditions) do
    if c.type == t then return c end
  end
  return nil
end

if obj.status == nil or obj.status.observedGeneration == nil
    or obj.status.observedGeneration < obj.metadata.generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe the latest spec"
  return hs
end
local ready = condition(obj, "Ready")
local degraded = condition(obj, "Degraded")
if ready ~= nil and ready.reason == "InvalidSpec" then
  hs.status = "Degraded"
  hs.message = ready.message
elseif degraded ~= nil and degraded.status == "True" then
  hs.status = "Degraded"
  hs.message = degraded.reason .. ": " .. (degraded.message or "")
elseif ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  hs.message = ready.message
else
  hs.status = "Progressing"
  if ready ~= nil then hs.message = ready.reason .. ": " .. (ready.message or "") else hs.message = "Waiting for a source" end
end
return hs
